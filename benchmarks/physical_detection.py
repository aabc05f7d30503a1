"""Physical-scene benchmark for a DETECTOR: the patch as a poster on a facade, boxes scored (issue 15).

    python -m benchmarks.physical_detection --model fcos_ddrnet --patch eot_L --split val --seeds 3
    python -m benchmarks.physical_detection --model fcos_ddrnet --patch apricot_L --resume

The scenes are ``benchmarks.physical``'s (the demo's renderer: facade planes from the labels, perspective,
homography tracking, capture simulation, occlusion; the poster on the middle half of each sequence,
placement seed ``s`` at poster scale ``SCALES[s % 3]``). On every patched frame the detector runs on the
clean twin, on the attacked frame, behind Z-Mask, and on the *oracle* frame (exactly the visible poster
masked as Z-Mask masks): COCO mAP@0.5 and mAP@[.5:.95] against the CamVid boxes (connected components of
the detection classes, ``realtime.data.detection``) of the pixels the poster leaves visible, the share of
the attack's mAP@0.5 damage undone, false detections on the poster (score >= 0.3, IoU >= 0.3 with the
poster's box), Z-Mask's flag rate and mask IoU / precision / recall against the poster. Clean false
positives: Z-Mask on every clean frame of ``--clean-splits``. The live step (voting, propagation) is the
segmentation benchmark's only: a detector's live output is not scored here.

Writes ``<out-dir>/<model>_<patch>_<tag>.{json,md}``; finished runs under ``<out-dir>/parts/`` are reused
by ``--resume`` (the clean runs by every patch of the same model and tag).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from realtime.core.box_metrics import coco_map
from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.core.devices import describe, pick_device
from realtime.data import IGNORE_INDEX
from realtime.data.detection import BoxConfig, boxes_from_label
from realtime.defenses.artifact import load_calibration
from realtime.defenses.registry import ZMASK_VARIANTS, DefenseContext, build_defense
from realtime.live.sources.demo import DemoConfig, DemoSource
from realtime.models import build_model, fingerprint, model_arg, model_slug

from .physical import DEFAULT_DIR, REPO, SCALES, cached_part, frame_tensor, library_patch, sequences, sha
from .physical_metrics import MaskSums
from .robustness_detection import frame_detections, mask_box
from .robustness_detection_report import as_tensors, false_detections_on_patch

OUTPUTS = ("clean", "attacked", "defended", "oracle")


@dataclass
class PhysicalDetectionConfig:
    """Settings of one detector run (the command line fills it)."""
    model: str = "fcos_ddrnet"
    weights: Optional[str] = "default"
    calibration: Optional[str] = None
    defense: str = "zmask"
    cue: Optional[str] = None                # zmask_cue: the outlier-cue artifact (default: the shipped one)
    refine: str = "none"                     # grabcut: snap flagged frames' masks to the poster's edges
    patch: str = "eot_L"                     # a library condition (<model>_<name>.png) or a PNG path
    split: str = "val"
    clean_splits: Tuple[str, ...] = ("train", "val")
    seeds: int = 3
    score_thr: float = 0.3                   # false detection on the poster: score >= this ...
    iou_thr: float = 0.3                     # ... and IoU >= this with the poster's box
    data: Optional[str] = None
    device: str = "cpu"
    out_dir: str = str(DEFAULT_DIR)
    tag: str = "shipped"
    limit: Optional[int] = None              # frames per sequence (development)
    resume: bool = False
    progress: bool = True


def patch_path(cfg: PhysicalDetectionConfig) -> Path:
    return library_patch(cfg.model, cfg.patch)


def visible_targets(lab: np.ndarray, gt: np.ndarray) -> Dict[str, list]:
    """The CamVid boxes of the objects the poster leaves visible (its pixels count as no object)."""
    seen = np.where(gt, IGNORE_INDEX, lab)
    boxes, labels = boxes_from_label(seen, BoxConfig())
    return {"boxes": boxes.tolist(), "labels": labels.tolist()}


class Bench:
    """The detector and its Z-Mask, shared by every run."""

    def __init__(self, cfg: PhysicalDetectionConfig) -> None:
        if cfg.defense not in ZMASK_VARIANTS:
            raise KeyError(f"--defense must be one of {', '.join(ZMASK_VARIANTS)}, got {cfg.defense!r}")
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.model = build_model(cfg.model, weights=cfg.weights, device=self.device)
        if getattr(self.model, "task", "segmentation") != "detection":
            raise ValueError(f"{cfg.model} is not a detector; use python -m benchmarks.physical for segmenters")
        self.cal_path = (Path(cfg.calibration) if cfg.calibration
                         else REPO / "calibration" / "shipped" / f"{model_slug(cfg.model)}.safetensors")
        cal = load_calibration(self.cal_path, self.model)
        ctx = DefenseContext(self.model, cfg.model, device=self.device, calibration=self.cal_path, loaded_calibration=cal)
        self.defense = build_defense(cfg.defense, ctx, **({"cue": cfg.cue} if cfg.cue else {}),
                                     refine=cfg.refine)
        self.identity = {"metrics": 1, "model": cfg.model, "fingerprint": fingerprint(self.model),
                         "calibration": sha(self.cal_path), "defense": cfg.defense, "limit": cfg.limit,
                         **({"cue": sha(Path(cfg.cue))} if cfg.cue else {}),
                         **({"refine": cfg.refine} if cfg.refine != "none" else {})}

    @torch.inference_mode()
    def frame(self, x: torch.Tensor, gt: Optional[np.ndarray] = None) -> Dict:
        """Z-Mask on one frame: its detections, the first pass's, flag, score, mask; plain on the oracle frame."""
        res = self.defense(x)
        masked = (res.mask[0, 0] < 0.5).cpu().numpy() if res.mask is not None else None
        out = {"attacked": frame_detections(res.first_output[0]), "defended": frame_detections(res.output[0]),
               "flagged": bool(res.flagged[0]), "score": float(res.score[0]),
               "masked": masked if masked is not None and masked.any() else None}
        if gt is not None:
            keep = torch.from_numpy(~gt).to(device=x.device, dtype=x.dtype)[None, None]
            out["oracle"] = frame_detections(self.defense.plain(self.defense.zm.shield(x, keep))[0])
        return out


def clean_run(bench: Bench, split: str, seq: str) -> Dict:
    """Z-Mask's flags and scores on every clean frame of one sequence."""
    src = DemoSource(DemoConfig(sequence=seq, split=split, patch=str(patch_path(bench.cfg)), patch_frames=0),
                     bench.cfg.data)
    flags, scores = [], []
    for k, _n, clean, _shown, _gt, _lab in src.scenes():
        if bench.cfg.limit is not None and k >= bench.cfg.limit:
            break
        r = bench.frame(frame_tensor(clean, bench.device))
        flags.append(r["flagged"])
        scores.append(r["score"])
    return {"split": split, "sequence": seq, "flags": flags, "scores": scores}


def attacked_run(bench: Bench, seq: str, seed: int, bar: Optional[tqdm] = None) -> Dict:
    """One placement on one sequence: per patched frame the targets, every output's detections, flag, mask."""
    cfg = bench.cfg
    demo = DemoConfig(sequence=seq, split=cfg.split, patch=str(patch_path(cfg)), seed=seed,
                      poster_scale=SCALES[seed % len(SCALES)])
    src = DemoSource(demo, cfg.data)
    n = min(src.length, cfg.limit) if cfg.limit else src.length
    src.cfg = DemoConfig(**{**asdict(demo), "patch_start": n // 4, "patch_frames": n // 2})
    frames: List[Dict] = []
    mask = MaskSums()
    for k, _num, clean, shown, gt, lab in src.scenes():
        if k >= n:
            break
        if bar is not None:
            bar.update(1)
        if not gt.any():
            continue
        x = frame_tensor(shown, bench.device)
        r = bench.frame(x, gt)
        with torch.inference_mode():
            r["clean"] = frame_detections(bench.defense.plain(frame_tensor(clean, bench.device))[0])
        mask.add(r.pop("masked"), gt)
        r["targets"] = visible_targets(lab, gt)
        r["poster_box"] = mask_box(torch.from_numpy(gt))
        frames.append(r)
    return {"frames": frames, "mask": mask.to_dict()}


def totals(runs: Sequence[Dict], clean_flags: Sequence[Sequence[bool]], cfg: PhysicalDetectionConfig) -> Dict:
    """mAP per output, damage undone, false detections on the poster, flags, mask and clean FPR."""
    frames = [f for r in runs for f in r["frames"]]
    mask = MaskSums()
    for r in runs:
        mask.merge(MaskSums.from_dict(r["mask"]))
    res: Dict = {"patched_frames": len(frames), "mask": mask.summary()}
    if frames and any(f["targets"]["boxes"] for f in frames):
        targets = [as_tensors(f["targets"]) for f in frames]
        names = BoxConfig().classes
        res["map"] = {o: coco_map([as_tensors(f[o]) for f in frames], targets, names) for o in OUTPUTS}
        m = {o: res["map"][o]["map_50"] for o in OUTPUTS}
        dmg = m["clean"] - m["attacked"]
        res["map50_damage_undone"] = (m["defended"] - m["attacked"]) / dmg if dmg > 1e-9 else None
        res["map50_damage_undone_oracle"] = (m["oracle"] - m["attacked"]) / dmg if dmg > 1e-9 else None
    res["false_on_poster"] = {o: sum(false_detections_on_patch(f[o]["boxes"], f[o]["scores"], f["poster_box"],
                                                               cfg.score_thr, cfg.iou_thr) for f in frames)
                              for o in OUTPUTS}
    res["flag_rate"] = float(np.mean([f["flagged"] for f in frames])) if frames else None
    flat = [v for c in clean_flags for v in c]
    res["clean_frames"] = len(flat)
    res["clean_fpr"] = float(np.mean(flat)) if flat else None
    return res


def _f(v: Optional[float], pct: bool = False) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def markdown(result: Dict) -> str:
    c, t = result["config"], result["totals"]
    mp = t.get("map", {})
    m50 = " / ".join(_f(mp.get(o, {}).get("map_50")) for o in OUTPUTS)
    m = " / ".join(_f(mp.get(o, {}).get("map")) for o in OUTPUTS)
    fp = " / ".join(str(t["false_on_poster"][o]) for o in OUTPUTS)
    mk = t["mask"]
    lines = [f"# Physical-scene benchmark (detector): `{c['model']}`, patch {Path(result['patch_path']).stem}, "
             f"calibration {c['tag']}, defense `{c['defense']}`", "",
             f"Split {c['split']}, {c['seeds']} placements per sequence, {t['patched_frames']} patched frames; "
             f"clean false positives on every frame of {', '.join(c['clean_splits'])} ({t['clean_frames']} frames). "
             f"Boxes: CamVid connected components of {', '.join(BoxConfig().classes)} outside the poster. "
             f"Device: {result['env'].get('device', '?')}; {result['seconds']:.0f} s.", "",
             "| mAP@0.5 clean / attacked / Z-Mask / oracle | mAP@[.5:.95] (same) | mAP@0.5 damage undone (Z-Mask / oracle) "
             "| false detections on the poster (clean / attacked / Z-Mask / oracle) | flagged | mask IoU (precision / recall) "
             "| clean FPR |", "| --- | --- | --- | --- | --- | --- | --- |",
             f"| {m50} | {m} | {_f(t.get('map50_damage_undone'), True)} / {_f(t.get('map50_damage_undone_oracle'), True)} "
             f"| {fp} | {_f(t['flag_rate'], True)} | {_f(mk['iou_pooled'])} ({_f(mk['precision'])} / {_f(mk['recall'])}) "
             f"| {'-' if t['clean_fpr'] is None else format(t['clean_fpr'], '.1%')} |", "", "## Per run", "",
             "| sequence | seed | poster scale | patched | mAP@0.5 clean / attacked / Z-Mask / oracle | false on poster "
             "(attacked / Z-Mask) | flagged | mask IoU |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.get("runs", []):
        rt = r["totals"]
        rm = " / ".join(_f(rt.get("map", {}).get(o, {}).get("map_50")) for o in OUTPUTS)
        lines.append(f"| {r['sequence']} | {r['seed']} | {r['poster_scale']} | {rt['patched_frames']} | {rm} | "
                     f"{rt['false_on_poster']['attacked']} / {rt['false_on_poster']['defended']} | "
                     f"{_f(rt['flag_rate'], True)} | {_f(rt['mask']['iou_pooled'])} |")
    lines += ["", "## Clean sequences", "", "| split | sequence | frames | flagged | max score |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c['split']} | {c['sequence']} | {c['frames']} | {c['flagged']} | {_f(c['max_score'])} |"
              for c in result.get("clean", [])]
    lines.append("")
    return "\n".join(lines)


def run(cfg: PhysicalDetectionConfig) -> Dict:
    t0 = time.time()
    path = patch_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"patch {path} not found (a library condition such as eot_L, or a PNG path)")
    bench = Bench(cfg)
    out = Path(cfg.out_dir)
    name = f"{model_slug(cfg.model)}_{path.stem.replace(model_slug(cfg.model) + '_', '')}_{cfg.tag}"
    parts = out / "parts" / name
    key = {**bench.identity, "patch": sha(path), "split": cfg.split}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    # the clean runs record flags and scores: neither the patch nor the mask refinement changes them
    clean_tag = hashlib.sha256(json.dumps({k: v for k, v in key.items() if k not in ("patch", "refine")},
                                          sort_keys=True).encode()).hexdigest()[:12]
    shared = out / "parts" / f"{model_slug(cfg.model)}_clean_{cfg.tag}"       # every patch's clean runs
    clean = [cached_part(shared / f"clean_{split}_{seq}.json", clean_tag, cfg.resume,
                         lambda s=split, q=seq: clean_run(bench, s, q))
             for split in cfg.clean_splits
             for seq in tqdm(sequences(split, cfg.data), desc=f"clean {split}", disable=not cfg.progress)]
    bar = tqdm(total=None, desc=f"attacked {cfg.split}", unit="frame", disable=not cfg.progress)
    runs = [(seq, seed, cached_part(parts / f"run_{seq}_s{seed}.json", tag, cfg.resume,
                                    lambda q=seq, s=seed: attacked_run(bench, q, s, bar)))
            for seq in sequences(cfg.split, cfg.data) for seed in range(cfg.seeds)]
    bar.close()
    result = {"config": asdict(cfg), "patch_path": str(path), "calibration_path": str(bench.cal_path),
              "identity": key, "env": describe(bench.device), "seconds": round(time.time() - t0, 1),
              "zmask": bench.defense.describe(), "totals": totals([r for _, _, r in runs], [c["flags"] for c in clean], cfg),
              "runs": [{"sequence": s, "seed": sd, "poster_scale": SCALES[sd % len(SCALES)],
                        "totals": totals([r], [], cfg)} for s, sd, r in runs],
              "clean": [{"split": c["split"], "sequence": c["sequence"], "frames": len(c["flags"]),
                         "flagged": int(sum(c["flags"])), "max_score": max(c["scores"], default=None)} for c in clean]}
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result))
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> PhysicalDetectionConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.physical_detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fcos_ddrnet", type=model_arg)
    p.add_argument("--weights", default="default")
    p.add_argument("--calibration", default=None, help="Z-Mask artifact (default: the shipped one)")
    p.add_argument("--defense", default="zmask", help=f"one of {', '.join(ZMASK_VARIANTS)}")
    p.add_argument("--cue", default=None, help="zmask_cue: outlier-cue artifact (default: the shipped one)")
    p.add_argument("--refine", default="none", choices=("none", "grabcut"),
                   help="grabcut: snap each flagged frame's mask to the poster's edges in the image")
    p.add_argument("--tag", default=None, help="name of this calibration in the output files (default: its stem)")
    p.add_argument("--patch", default="eot_L", help="library condition (eot_L, apricot_L, ...) or a PNG path")
    p.add_argument("--split", default="val")
    p.add_argument("--clean-splits", default="train,val", help="splits whose every clean frame counts false positives")
    p.add_argument("--seeds", type=int, default=3, help="placements per sequence")
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=str(DEFAULT_DIR))
    p.add_argument("--limit", type=int, default=None, help="frames per sequence (development)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    tag = a.tag or (Path(a.calibration).stem if a.calibration else "shipped")
    return PhysicalDetectionConfig(model=a.model, weights=a.weights, calibration=a.calibration, defense=a.defense, cue=a.cue, refine=a.refine,
                                   patch=a.patch, split=a.split, clean_splits=tuple(s for s in a.clean_splits.split(",") if s),
                                   seeds=a.seeds, data=a.data, device=a.device, out_dir=a.out_dir, tag=tag, limit=a.limit,
                                   resume=a.resume, progress=not a.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_args(argv)
        result = run(cfg)
    except USER_ERRORS as exc:
        return report_error(exc)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
