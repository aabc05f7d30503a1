"""Physical-scene benchmark: a patch printed as a poster on a facade, as the camera sees it.

    python -m benchmarks.physical --model ddrnet23_slim --patch physeot_L --split val --seeds 3
    python -m benchmarks.physical --model bisenetv1 --patch eot_L --calibration my.safetensors --tag mycal
    python -m benchmarks.physical --model ddrnet23_slim --resume          # continue an interrupted run

For every sequence of ``--split`` and every placement seed, the demo's renderer (``realtime.attacks.scene``:
facade planes from the labels, perspective from the vanishing point, homography tracking, capture
simulation, occlusion) puts the patch on the middle half of the sequence. Scored on the patched frames,
against the CamVid labels on the pixels outside the poster:

* single frame: mIoU of the clean twin, of the attacked frame, and after Z-Mask; the fraction of the
  damage undone; the per-frame flag rate; mask IoU / precision / recall against the visible poster;
* live (the ``realtime.run`` step: k-of-n voting, mask propagation): the emitted labels' mIoU, alarm
  rate, frames from the poster's first frame to the alarm, the emitted mask against the poster.

Clean false positives: the defense on every clean frame of ``--clean-splits`` (default train + val), per
frame and through the voter (an alarm on a clean sequence is a false alarm).
Placement seed ``s`` uses poster scale ``SCALES[s % 3]`` and its own capture draws. Writes
``<out-dir>/<model>_<patch>_<tag>.{json,md}`` and plots; finished runs are kept under
``<out-dir>/parts/`` and skipped by ``--resume``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.core.devices import describe, pick_device
from realtime.data import CamVid
from realtime.defenses.artifact import load_calibration
from realtime.defenses.registry import ZMASK_VARIANTS, DefenseContext, build_defense
from realtime.live.sources.demo import DemoConfig, DemoSource
from realtime.live.pipeline import preprocess
from realtime.live.step import DefenseStep, to_label
from realtime.live.voting import VotingConfig, simulate
from realtime.models import build_model, fingerprint, model_arg, model_slug

from .physical_metrics import RunSums, confusion, totals
from .physical_report import write_report

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "realtime" / "attacks" / "library"
DEFAULT_DIR = REPO / "benchmarks" / "results" / "physical"
SCALES = (0.8, 0.6, 1.0)


@dataclass
class PhysicalConfig:
    """Settings of one benchmark run (the command line fills it)."""
    model: str = "ddrnet23_slim"
    weights: Optional[str] = "default"
    calibration: Optional[str] = None
    defense: str = "zmask"                   # zmask, or zmask_cue (Z-Mask + the outlier cue)
    patch: str = "physeot_L"                 # a library condition name (<model>_<name>.png) or a PNG path
    split: str = "val"
    clean_splits: Tuple[str, ...] = ("train", "val")
    seeds: int = 3
    vote: str = "3/5"
    mask_window: int = 3
    dilate: int = 16
    motion: bool = False                     # motion-compensated mask propagation in the live step
    cue: Optional[str] = None                # zmask_cue: the outlier-cue artifact (default: the shipped one)
    refine: str = "none"                     # grabcut: snap flagged frames' masks to the poster's edges
    data: Optional[str] = None
    device: str = "cpu"
    out_dir: str = str(DEFAULT_DIR)
    tag: str = "shipped"
    limit: Optional[int] = None              # frames per sequence (development)
    resume: bool = False
    progress: bool = True


def library_patch(model: str, patch: str) -> Path:
    """``patch`` itself when it is a PNG path, else the library's ``<model>_<patch>.png``."""
    p = Path(patch)
    if p.suffix.lower() == ".png":
        return p
    return LIBRARY / f"{model_slug(model)}_{patch}.png"


def patch_path(cfg: PhysicalConfig) -> Path:
    return library_patch(cfg.model, cfg.patch)


def cached_part(path: Path, key: str, resume: bool, make: Callable[[], Any]) -> Any:
    """A finished run's value read back from ``path`` (``resume`` and the same ``key``), else ``make()``
    written there: how every benchmark run of a physical benchmark is kept and resumed."""
    if resume and path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            return d["value"]
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "value": value})
    return value


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def frame_tensor(img: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1,3,H,W) in [0,1] on ``device``: the live pipeline's own preprocessing at the frame's size."""
    return preprocess(img, None, device)[1]


class Bench:
    """The model, its Z-Mask and the live step, shared by every run of the benchmark."""

    def __init__(self, cfg: PhysicalConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.model = build_model(cfg.model, weights=cfg.weights, device=self.device)
        cal_path = Path(cfg.calibration) if cfg.calibration else REPO / "calibration" / "shipped" / f"{model_slug(cfg.model)}.safetensors"
        self.cal_path = cal_path
        cal = load_calibration(cal_path, self.model)
        ctx = DefenseContext(self.model, cfg.model, device=self.device, calibration=cal_path, loaded_calibration=cal)
        if cfg.defense not in ZMASK_VARIANTS:
            raise KeyError(f"--defense must be zmask or zmask_cue, got {cfg.defense!r}")
        self.defense = build_defense(cfg.defense, ctx, **({"cue": cfg.cue} if cfg.cue else {}),
                                     refine=cfg.refine)
        self.voting = VotingConfig.parse(cfg.vote, mask_window=cfg.mask_window, dilate=cfg.dilate, motion=cfg.motion)
        self.identity = {"metrics": 2, "model": cfg.model, "fingerprint": fingerprint(self.model), "calibration": sha(cal_path),
                         "vote": self.voting.describe(), "limit": cfg.limit,
                         **({"defense": cfg.defense} if cfg.defense != "zmask" else {}),
                         **({"cue": sha(Path(cfg.cue))} if cfg.cue else {}),
                         **({"refine": cfg.refine} if cfg.refine != "none" else {})}

    @torch.inference_mode()
    def single(self, x: torch.Tensor):
        res = self.defense(x)
        masked = (res.mask[0, 0] < 0.5).cpu().numpy() if res.mask is not None else None
        return (to_label(res.first_output), to_label(res.output), bool(res.flagged[0]), float(res.score[0]),
                masked if masked is not None and masked.any() else None)

    def step(self) -> DefenseStep:
        return DefenseStep(self.defense, self.voting, self.device)


def sequences(split: str, data: Optional[str]) -> List[str]:
    return list(CamVid(data, split).sequences)


def clean_run(bench: Bench, split: str, seq: str) -> Dict:
    """Per-frame flags and scores of the defense on one clean sequence, and the voter's alarms on them."""
    src = DemoSource(DemoConfig(sequence=seq, split=split, patch=str(patch_path(bench.cfg)), patch_frames=0),
                     bench.cfg.data)
    flags, scores = [], []
    for k, _n, clean, _shown, _gt, _lab in src.scenes():
        if bench.cfg.limit is not None and k >= bench.cfg.limit:
            break
        _, _, flagged, score, _ = bench.single(frame_tensor(clean, bench.device))
        flags.append(flagged)
        scores.append(score)
    return {"split": split, "sequence": seq, "flags": flags, "scores": scores,
            "alarms": simulate(flags, replace(bench.voting, propagate=False))}


def attacked_run(bench: Bench, seq: str, seed: int, bar: Optional[tqdm] = None) -> RunSums:
    """One placement on one sequence: single-frame and live scores over its patched frames."""
    cfg = bench.cfg
    demo = DemoConfig(sequence=seq, split=cfg.split, patch=str(patch_path(cfg)), seed=seed,
                      poster_scale=SCALES[seed % len(SCALES)])
    src = DemoSource(demo, cfg.data)
    n = min(src.length, cfg.limit) if cfg.limit else src.length
    src.cfg = replace(demo, patch_start=n // 4, patch_frames=n // 2)
    step, sums = bench.step(), RunSums()
    first_patched: Optional[int] = None
    for k, _num, clean, shown, gt, lab in src.scenes():
        if k >= n:
            break
        x = frame_tensor(shown, bench.device)
        with torch.inference_mode():
            live = step.step(x)
        sums.frames += 1
        sums.gt.append(bool(gt.any()))
        sums.live.append(2 if live.alarm else int(live.flagged or live.carried))
        if not gt.any():
            sums.scores.append(live.score if not live.propagated else None)
            if bar is not None:
                bar.update(1)
            continue
        first_patched = k if first_patched is None else first_patched
        with torch.inference_mode():
            clean_lab = to_label(bench.defense.plain(frame_tensor(clean, bench.device)))
        att_lab, def_lab, flagged, score, masked = bench.single(x)
        with torch.inference_mode():
            keep = torch.from_numpy(~gt).to(device=bench.device, dtype=x.dtype)[None, None]
            oracle_lab = to_label(bench.defense.plain(bench.defense.zm.shield(x, keep)))
        valid = ~gt
        for key, pred in (("clean", clean_lab), ("attacked", att_lab), ("defended", def_lab), ("live", live.label),
                          ("oracle", oracle_lab)):
            sums.cms[key] += confusion(pred, lab, valid)
        sums.patched += 1
        sums.flagged += int(flagged)
        sums.scores.append(score)
        sums.mask.add(masked, gt)
        sums.live_mask.add(live.masked, gt)
        sums.live_flagged += int(live.flagged or live.carried)
        sums.alarm_frames += int(live.alarm)
        if live.alarm and sums.frames_to_alarm is None:
            sums.frames_to_alarm = k - first_patched
        if bar is not None:
            bar.update(1)
    return sums


def run(cfg: PhysicalConfig) -> Dict:
    t0 = time.time()
    path = patch_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"patch {path} not found (craft it with python -m realtime.attacks.craft "
                                f"--placement scene, or pass a PNG)")
    bench = Bench(cfg)
    out = Path(cfg.out_dir)
    name = f"{model_slug(cfg.model)}_{path.stem.replace(model_slug(cfg.model) + '_', '')}_{cfg.tag}"
    parts = out / "parts" / name
    key = {**bench.identity, "patch": sha(path), "split": cfg.split}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    # clean runs depend on the model, calibration and voting only (not the scored outputs' version)
    clean_key = {k: v for k, v in key.items() if k != "metrics"}
    clean_tag = hashlib.sha256(json.dumps(clean_key, sort_keys=True).encode()).hexdigest()[:12]

    clean = [cached_part(parts / f"clean_{split}_{seq}.json", clean_tag, cfg.resume,
                         lambda s=split, q=seq: clean_run(bench, s, q))
             for split in cfg.clean_splits
             for seq in tqdm(sequences(split, cfg.data), desc=f"clean {split}", disable=not cfg.progress)]
    bar = tqdm(total=None, desc=f"attacked {cfg.split}", unit="frame", disable=not cfg.progress)
    runs: List[Tuple[str, int, RunSums]] = [
        (seq, seed, RunSums.from_dict(cached_part(parts / f"run_{seq}_s{seed}.json", tag, cfg.resume,
                                                  lambda q=seq, sd=seed: attacked_run(bench, q, sd, bar).to_dict())))
        for seq in sequences(cfg.split, cfg.data) for seed in range(cfg.seeds)]
    bar.close()
    result = {"config": {**asdict(cfg), "patch_path": str(path), "calibration_path": str(bench.cal_path)},
              "identity": key, "env": describe(bench.device), "seconds": round(time.time() - t0, 1),
              "zmask": bench.defense.describe(),
              "totals": totals([r for _, _, r in runs], [c["flags"] for c in clean], [c["alarms"] for c in clean]),
              "runs": [{"sequence": s, "seed": sd, "poster_scale": SCALES[sd % len(SCALES)],
                        "totals": totals([r], [], []), "trace": {"scores": r.scores, "live": r.live, "gt": r.gt}}
                       for s, sd, r in runs],
              "clean": [{k: c[k] for k in ("split", "sequence")} | {"frames": len(c["flags"]), "flagged": sum(c["flags"]),
                         "alarm_frames": sum(c["alarms"]), "max_score": max(c["scores"], default=None)} for c in clean]}
    write_report(result, out, name)
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> PhysicalConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.physical", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ddrnet23_slim", type=model_arg)
    p.add_argument("--weights", default="default")
    p.add_argument("--calibration", default=None, help="Z-Mask artifact (default: the shipped one)")
    p.add_argument("--defense", default="zmask", help="zmask, or zmask_cue (Z-Mask + the outlier cue)")
    p.add_argument("--tag", default=None, help="name of this calibration in the output files (default: its stem)")
    p.add_argument("--patch", default="physeot_L", help="library condition (e.g. physeot_L, eot_L) or a PNG path")
    p.add_argument("--split", default="val")
    p.add_argument("--clean-splits", default="train,val", help="splits whose every clean frame counts false alarms")
    p.add_argument("--seeds", type=int, default=3, help="placements per sequence")
    p.add_argument("--vote", default="3/5")
    p.add_argument("--mask-window", type=int, default=3)
    p.add_argument("--dilate", type=int, default=16)
    p.add_argument("--motion", action="store_true", help="motion-compensated mask propagation in the live step")
    p.add_argument("--cue", default=None, help="zmask_cue: outlier-cue artifact (default: the shipped one)")
    p.add_argument("--refine", default="none", choices=("none", "grabcut"),
                   help="grabcut: snap each flagged frame's mask to the poster's edges in the image")
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=str(DEFAULT_DIR))
    p.add_argument("--limit", type=int, default=None, help="frames per sequence (development)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    tag = a.tag or (Path(a.calibration).stem if a.calibration else "shipped")
    return PhysicalConfig(model=a.model, weights=a.weights, calibration=a.calibration, defense=a.defense, patch=a.patch, split=a.split,
                          clean_splits=tuple(s for s in a.clean_splits.split(",") if s), seeds=a.seeds, vote=a.vote,
                          mask_window=a.mask_window, dilate=a.dilate, motion=a.motion, cue=a.cue, refine=a.refine, data=a.data, device=a.device, out_dir=a.out_dir,
                          tag=tag, limit=a.limit, resume=a.resume, progress=not a.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_args(argv)
        result = run(cfg)
    except USER_ERRORS as exc:
        return report_error(exc)
    t = result["totals"]
    print(f"{cfg.model} {cfg.patch} ({cfg.tag}): mIoU clean {t['miou']['clean']:.3f} attacked {t['miou']['attacked']:.3f} "
          f"defended {t['miou']['defended']:.3f} live {t['miou']['live']:.3f}; flagged {t['flag_rate']:.0%}, "
          f"alarm {t['alarm_rate']:.0%}, mask IoU {t['mask']['iou_pooled']}, clean FPR {t['clean_fpr']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
