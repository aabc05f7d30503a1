"""Every defense under every patch condition for a DETECTOR on CamVid (issue 9, item 5).

    python -m benchmarks.robustness --model fcos_ddrnet --split val            # --task detection is implied
    python -m benchmarks.robustness_detection --model fcos_ddrnet --defenses none,zmask --limit 8
    python -m benchmarks.robustness_detection --model fcos_ddrnet --weights runs/fcos_ddrnet/best.pt --resume

For each defense (none, lgs, zmask by default) x condition (clean, random_L, eot_S/M/L, apricot_L: the
``<model>_<name>.png`` patches in the library): COCO mAP@0.5 and mAP@[.5:.95] over the WHOLE image against
every ground-truth box (the paper's protocol; pycocotools), per-class AP@0.5, flag rate, the defense's
per-frame score, detection AUC / TPR at 1 % FPR of that score (clean frames negative, patched positive) and
median per-frame latency. False detections on the patch (score >= 0.3, IoU >= 0.3 with the patch's box) are
counted for every defense and patched condition; the clean column counts them at the place the L patch
would occupy (the baseline of the ``apricot_L`` column). Placement, paste and capture are the segmentation
benchmark's (``benchmarks.robustness_conditions``): one seeded place per frame shared by every cell.

Writes ``<out-dir>/robustness_<model>_<split>.{json,md}`` and ``..._map50.png``; raw per-(defense, condition)
cells go to ``<out-dir>/partial/<model>_<split>/`` so ``--resume`` skips finished cells.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from realtime.attacks.apply import CaptureConfig, patch_size_for
from realtime.data import CamVid, resolve_data_dir
from realtime.data.detection import CamVidDetection
from realtime.defenses.registry import DefenseContext
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models

from .robustness import (add_run_args, csv_list, git_commit, isolated_hooks, make_defense, run_and_write,
                         validate_split)
from .robustness_conditions import LIBRARY, Condition, capture_config, paste, resolve_conditions
from .robustness_detection_report import (DEFAULT_DET_DIR, false_detections_on_patch, model_markdown,
                                          summarize_detection_defense, write_outputs)
from .robustness_runner import CellSettings, cell_path, cell_signature, save_cell, timed_call, warm_up

DEFAULT_DEFENSES = ("none", "lgs", "zmask")


@dataclass
class DetectionRobustnessConfig:
    """Command-line settings of one detection run."""
    model: str
    weights: str = "default"                    # "default" (shipped), "none" (initialisation) or a checkpoint
    calibration: Optional[str] = None           # Z-Mask artifact (default calibration/shipped/<model>.safetensors)
    data: Optional[str] = None
    split: str = "val"
    defenses: Optional[List[str]] = None        # None: DEFAULT_DEFENSES (zmask skipped with a warning if uncalibrated)
    conditions: Optional[List[str]] = None      # None: every condition in the library
    limit: Optional[int] = None
    every: int = 1
    batch: int = 1
    seed: int = 0
    capture: str = "none"
    max_fpr: float = 0.01
    score_thr: float = 0.3                      # false detection on the patch: score >= this ...
    iou_thr: float = 0.3                        # ... and IoU >= this with the patch's box
    device: str = "auto"
    library: str = str(LIBRARY)
    out_dir: str = str(DEFAULT_DET_DIR)
    json: Optional[str] = None
    resume: bool = False
    progress: bool = True


@dataclass
class DetectionCell:
    """Raw per-frame results of one (defense, condition): detections kept, so mAP is recomputable."""
    defense: str
    condition: str
    signature: Dict[str, Any]
    latency_ms: List[float]
    detections: List[Dict[str, list]]                    # per frame: boxes (xyxy), scores, labels
    patch_boxes: List[Optional[List[float]]]             # per frame: the patch's box (clean: the L place), xyxy
    scores: Optional[List[float]] = None
    flagged: Optional[List[bool]] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def load_detection_cell(partial_dir: Path, defense: str, condition: str,
                        signature: Dict[str, Any]) -> Optional[DetectionCell]:
    """The saved cell if it exists and was computed under ``signature`` (same layout as segmentation cells)."""
    path = cell_path(partial_dir, defense, condition)
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    if not data or data.get("signature") != json.loads(json.dumps(signature)):
        return None
    return DetectionCell(**data)


def mask_box(mask: torch.Tensor) -> Optional[List[float]]:
    """xyxy box (x2/y2 exclusive, as the CamVid targets) of a (1,H,W) or (H,W) patch mask; None if empty."""
    m = mask.reshape(mask.shape[-2:]) > 0.5
    if not bool(m.any()):
        return None
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def frame_detections(out: Dict[str, torch.Tensor]) -> Dict[str, list]:
    return {"boxes": [[round(float(v), 2) for v in b] for b in out["boxes"].detach().cpu().tolist()],
            "scores": [round(float(s), 5) for s in out["scores"].detach().cpu().tolist()],
            "labels": [int(v) for v in out["labels"].detach().cpu().tolist()]}


def run_detection_cell(defense: Any, condition: Condition, images_u8: torch.Tensor, settings: CellSettings,
                       signature: Dict[str, Any], device: torch.device, capture: Optional[CaptureConfig],
                       l_patch_hw: Sequence[int], progress: bool = True) -> DetectionCell:
    """Run ``defense`` over every frame with ``condition``'s patch pasted; keep detections, scores, flags."""
    patch = condition.patch.to(device) if condition.patch is not None else None
    lat: List[float] = []
    dets: List[Dict[str, list]] = []
    boxes: List[Optional[List[float]]] = []
    scores: List[float] = []
    flagged: List[bool] = []
    n = len(images_u8)
    for s in tqdm(range(0, n, settings.batch), desc=f"{defense.name}/{condition.name}", unit="batch",
                  disable=not progress, leave=False):
        idx = list(range(s, min(s + settings.batch, n)))
        x = images_u8[s:s + len(idx)].to(device).float() / 255
        x, gt = paste(x, patch, idx, settings.seed, capture)
        if patch is None:                    # clean: the place the L patch would take (apricot baseline)
            _, gt = paste(x, torch.zeros(3, *l_patch_hw, device=device), idx, settings.seed, capture)
        x = x.detach()
        res, dt = timed_call(defense, x, device)
        out = res.output
        if not isinstance(out, (list, tuple)) or len(out) != len(idx) or not all(isinstance(o, dict) for o in out):
            raise ValueError(f"defense {defense.name} did not return one detection dict per frame "
                             f"(got {type(out).__name__}); is {settings.model} a detector?")
        lat += [dt] * len(idx)
        dets += [frame_detections(o) for o in out]
        boxes += [mask_box(g) for g in gt]
        if res.flagged is not None:
            flagged += [bool(v) for v in res.flagged.detach().reshape(-1).cpu().tolist()]
        if res.score is not None:
            scores += [float(v) for v in res.score.detach().reshape(-1).float().cpu().tolist()]
    if flagged and not scores:                # a flag without a score: the flag is the score
        scores = [float(f) for f in flagged]
    return DetectionCell(defense=defense.name, condition=condition.name, signature=signature, latency_ms=lat,
                         detections=dets, patch_boxes=boxes, scores=scores or None, flagged=flagged or None)


def _versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for mod in ("torchvision", "pycocotools"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod)
        except Exception:  # noqa: BLE001 - a missing version is reported, not fatal
            out[mod] = None
    return out


def _build_detector(cfg: DetectionRobustnessConfig, dev: torch.device) -> torch.nn.Module:
    if cfg.model not in list_models("detection"):
        raise KeyError(f"{cfg.model!r} is not a detector; detectors: {', '.join(list_models('detection'))}")
    weights = None if cfg.weights == "none" else cfg.weights
    return build_model(cfg.model, weights=weights, device=dev).eval()


def run(cfg: DetectionRobustnessConfig) -> Dict:
    """Measure every (defense, condition) cell (reusing saved ones with ``resume``) and summarise."""
    root = resolve_data_dir(cfg.data)
    validate_split(root, cfg.split)
    if cfg.batch < 1 or cfg.every < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ValueError("--batch, --every and --limit must be positive")
    capture = capture_config(cfg.capture)
    explicit = cfg.defenses is not None
    names = list(cfg.defenses if explicit else DEFAULT_DEFENSES)
    dev = pick_device(cfg.device)
    model = _build_detector(cfg, dev)
    fp = fingerprint(model)
    conds = resolve_conditions(cfg.model, cfg.conditions, fp, Path(cfg.library))
    for c in conds:
        if c.meta.get("task") not in (None, "detection"):
            print(f"warning: {c.path} was crafted for task {c.meta['task']!r}, not detection", file=sys.stderr)
    det_ds = CamVidDetection(str(root), cfg.split)
    idx = list(range(0, len(det_ds), cfg.every))[:cfg.limit]
    images, _ = CamVid(root, cfg.split).to_tensors(idx, progress=cfg.progress)
    targets = [det_ds.target(i) for i in idx]
    hw = tuple(images.shape[-2:])
    big = next((c for c in conds if c.name in ("apricot_L", "eot_L")), None)
    l_hw = tuple(big.patch.shape[1:]) if big is not None else patch_size_for("L", hw, task="detection")
    settings = CellSettings(cfg.model, fp, cfg.split, len(idx), cfg.seed, cfg.capture, cfg.batch, str(dev), cfg.every)
    partial = Path(cfg.out_dir) / "partial" / f"{cfg.model}_{cfg.split}"
    class_names = list(model.class_names)
    results: Dict[str, Dict] = {}
    skipped: Dict[str, str] = {}
    for name in tqdm(names, desc="defenses", unit="defense", disable=not cfg.progress):
        with isolated_hooks(model):
            ctx = DefenseContext(model, cfg.model, device=dev, data=str(root),
                                 calibration=Path(cfg.calibration) if cfg.calibration else None)
            try:
                defense = make_defense(name, ctx)
            except (FileNotFoundError, RuntimeError, ValueError) as exc:
                if explicit:
                    raise
                skipped[name] = str(exc).splitlines()[0]
                print(f"warning: defense {name} skipped: {skipped[name]}", file=sys.stderr)
                continue
            info = defense.describe()
            cells: Dict[str, DetectionCell] = {}
            warmed = False
            for cond in conds:
                sig = {**cell_signature(settings, info, cond), "l_patch_hw": list(l_hw)}
                cell = load_detection_cell(partial, name, cond.name, sig) if cfg.resume else None
                if cell is None:
                    if not warmed:
                        warm_up(defense, images, dev, cfg.batch)
                        warmed = True
                    cell = run_detection_cell(defense, cond, images, settings, sig, dev, capture, l_hw, cfg.progress)
                    save_cell(cell, partial)          # any dataclass with defense/condition: same file layout
                cells[cond.name] = cell
            results[name] = {**summarize_detection_defense(cells, targets, class_names, hw, cfg.max_fpr,
                                                           cfg.score_thr, cfg.iou_thr),
                             "flags": bool(defense.flags), "masks": bool(defense.masks), "describe": info}
            del defense
    return {"task": "detection",
            "settings": {**asdict(settings), "max_fpr": cfg.max_fpr, "data": str(root), "library": cfg.library,
                         "weights": cfg.weights, "calibration": cfg.calibration, "defenses": list(results),
                         "class_names": class_names, "image_hw": list(hw),
                         "gt_boxes": sum(len(t["labels"]) for t in targets),
                         "false_detection": {"score_thr": cfg.score_thr, "iou_thr": cfg.iou_thr},
                         "placement": "random, per-frame generator seed*100000+frame", "l_patch_hw": list(l_hw)},
            "env": {**describe(dev), **_versions()}, "git_commit": git_commit(), "skipped": skipped,
            "conditions": {c.name: c.describe() for c in conds}, "results": results}


def parse_args(argv: Optional[List[str]] = None) -> DetectionRobustnessConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness_detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"a detector: {', '.join(list_models('detection'))}")
    p.add_argument("--weights", default="default",
                   help="'default' (realtime/models/weights/<model>_camvid.pt), 'none', or a checkpoint path")
    p.add_argument("--calibration", default=None,
                   help="Z-Mask artifact (default calibration/shipped/<model>.safetensors)")
    p.add_argument("--defenses", default=None, help=f"comma-separated (default: {','.join(DEFAULT_DEFENSES)})")
    p.add_argument("--score-thr", type=float, default=0.3, help="false detections on the patch: min score")
    p.add_argument("--iou-thr", type=float, default=0.3, help="false detections on the patch: min IoU with its box")
    add_run_args(p, DEFAULT_DET_DIR, "none,random_L,eot_S,eot_M,eot_L,apricot_L")
    a = p.parse_args(argv)
    return DetectionRobustnessConfig(
        model=a.model, weights=a.weights, calibration=a.calibration, data=a.data, split=a.split,
        defenses=csv_list(a.defenses), conditions=csv_list(a.conditions), limit=a.limit, every=a.every,
        batch=a.batch, seed=a.seed, capture=a.capture, max_fpr=a.max_fpr, score_thr=a.score_thr,
        iou_thr=a.iou_thr, device=a.device, library=a.library, out_dir=a.out_dir, json=a.json, resume=a.resume,
        progress=not a.quiet)


def main(argv: Optional[List[str]] = None) -> int:
    return run_and_write(parse_args(argv), run, write_outputs, model_markdown)


__all__ = ["DetectionCell", "DetectionRobustnessConfig", "false_detections_on_patch", "load_detection_cell",
           "main", "mask_box", "run", "run_detection_cell"]

if __name__ == "__main__":
    sys.exit(main())
