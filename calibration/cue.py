"""Fit the outlier cue (``realtime.defenses.cue``) for a model from clean training frames only.

    python -m calibration.cue --model ddrnet23_slim
    python -m calibration.cue --model bisenetv1 --layers context_path.backbone.stem,spatial_path.conv_7x7

Half of the chosen frames give the per-channel mu / sigma of the cue's layers (on Z-Mask's working
grid); the other half, never used for the statistics, give the thresholds: per layer the ``--quantile``
of the per-frame max (the flag) and the ``--cell-quantile`` over all cells (the mask). No patch is seen:
the cue is fitted to the clean distribution, so it does not learn the look of our attacks. The frames
flagged on the held-out half and on ``--check-split`` (if present) are reported next to the artifact.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.core.devices import describe, pick_device
from realtime.core.taps import ActivationTaps
from realtime.data import CamVid, resolve_data_dir
from realtime.defenses.artifact import load_calibration
from realtime.defenses.cue import OutlierCue, cue_path
from realtime.defenses.spr import to_work
from realtime.models import build_model, fingerprint, model_slug

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LAYERS = {"ddrnet23_slim": ("conv1", "layer1"),
                  "bisenetv1": ("context_path.backbone.stem", "spatial_path.conv_7x7"),
                  "fcos_ddrnet": ("backbone.body.conv1", "backbone.body.layer1")}


@dataclass
class CueFitConfig:
    model: str
    data: Optional[str] = None
    calibration: Optional[str] = None        # the Z-Mask artifact whose working grid the cue shares
    layers: Optional[Sequence[str]] = None
    split: str = "train"
    every: int = 1
    pool: int = 3
    quantile: float = 0.998
    cell_quantile: float = 0.9999
    check_split: Optional[str] = "val"
    batch: int = 8
    device: str = "auto"
    out: Optional[str] = None
    report_dir: Optional[str] = None
    progress: bool = True


def _frames(ds: CamVid, idx: List[int], batch: int, progress: bool, desc: str):
    for s in tqdm(range(0, len(idx), batch), desc=desc, unit="batch", disable=not progress):
        x, _ = ds.to_tensors(idx[s:s + batch], progress=False)
        yield x.float() / 255


def fit(cfg: CueFitConfig) -> Dict:
    """Fit, save and report the cue; returns the report (also written as JSON)."""
    if not 0.5 < cfg.quantile < 1 or not 0.5 < cfg.cell_quantile < 1:
        raise ValueError("--quantile and --cell-quantile must be in (0.5, 1)")
    root = resolve_data_dir(cfg.data)
    dev = pick_device(cfg.device)
    model = build_model(cfg.model, weights="default", device=dev).eval()
    slug = model_slug(cfg.model)
    cal = load_calibration(cfg.calibration or REPO / "calibration" / "shipped" / f"{slug}.safetensors", model)
    spr = cal.config.spr
    layers = tuple(cfg.layers or DEFAULT_LAYERS.get(slug, ()))
    if not layers:
        raise ValueError(f"no default cue layers for {cfg.model}; pass --layers (the earliest blocks)")
    taps = ActivationTaps(model, layers)
    ds = CamVid(root, cfg.split)
    idx = list(range(0, len(ds), cfg.every))
    stat_idx, thr_idx = idx[0::2], idx[1::2]
    s1 = {n: 0.0 for n in layers}
    s2 = {n: 0.0 for n in layers}
    count = 0
    with torch.inference_mode():
        for x in _frames(ds, stat_idx, cfg.batch, cfg.progress, "cue stats"):
            _, maps = taps(x.to(dev))
            for n in layers:
                w = to_work(maps[n].float(), spr)
                s1[n] = s1[n] + w.sum(dim=(0, 2, 3)).double()
                s2[n] = s2[n] + (w.double() ** 2).sum(dim=(0, 2, 3))
            count += x.shape[0] * spr.work_size[0] * spr.work_size[1]
    mu = {n: (s1[n] / count).float().cpu() for n in layers}
    sigma = {n: (s2[n] / count - (s1[n] / count) ** 2).clamp_min(1e-10).sqrt().float().cpu() for n in layers}
    probe = OutlierCue(cfg.model, fingerprint(model), layers, mu, sigma, {n: 1.0 for n in layers},
                       {n: 1.0 for n in layers}, cfg.pool)
    frame_max, cells = _collect(probe, taps, ds, thr_idx, cfg, spr, dev, "cue thresholds")
    frame_thr = {n: float(np.quantile(frame_max[n], cfg.quantile)) for n in layers}
    cell_thr = {n: float(np.quantile(cells[n], cfg.cell_quantile)) for n in layers}
    cue = dataclasses.replace(probe, frame_threshold=frame_thr, cell_threshold=cell_thr, extra={
                      "split": cfg.split, "every": cfg.every, "stat_frames": len(stat_idx),
                      "threshold_frames": len(thr_idx), "quantile": cfg.quantile,
                      "cell_quantile": cfg.cell_quantile, "work_size": list(spr.work_size)})
    out = Path(cfg.out) if cfg.out else cue_path(cfg.model)
    cue.save(out)
    shown = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    report = {"artifact": str(shown), "model": cfg.model, "layers": list(layers), "frame_threshold": frame_thr,
              "cell_threshold": cell_thr, "env": describe(dev),
              "held_out_fpr": _fpr(cue, frame_max), "held_out_frames": len(thr_idx)}
    if cfg.check_split and (Path(root) / cfg.check_split).is_dir():
        check = CamVid(root, cfg.check_split)
        fm, _ = _collect(probe, taps, check, list(range(len(check))), cfg, spr, dev, f"cue {cfg.check_split}")
        report[f"{cfg.check_split}_fpr"] = _fpr(cue, fm)
        report[f"{cfg.check_split}_frames"] = len(check)
    taps.remove()
    rdir = Path(cfg.report_dir) if cfg.report_dir else REPO / "benchmarks" / "results" / "calibration" / f"{out.stem}"
    write_json(rdir / "cue.json", report)
    return report


def _collect(cue: OutlierCue, taps: ActivationTaps, ds: CamVid, idx: List[int], cfg: CueFitConfig, spr, dev,
             desc: str):
    """Per layer: per-frame max of the cue map, and a sample of cell values (every cell of every frame)."""
    frame_max: Dict[str, List[float]] = {n: [] for n in cue.layers}
    cells: Dict[str, List[np.ndarray]] = {n: [] for n in cue.layers}
    with torch.inference_mode():
        for x in _frames(ds, idx, cfg.batch, cfg.progress, desc):
            _, maps = taps(x.to(dev))
            cm = cue.maps(maps, spr)
            for n in cue.layers:
                frame_max[n] += cm[n].amax(dim=(1, 2, 3)).cpu().tolist()
                cells[n].append(cm[n].flatten().cpu().numpy())
    return {n: np.asarray(v) for n, v in frame_max.items()}, {n: np.concatenate(v) for n, v in cells.items()}


def _fpr(cue: OutlierCue, frame_max: Dict[str, np.ndarray]) -> float:
    """Fraction of frames whose cue score (max over layers of max / threshold) exceeds 1."""
    score = np.max([frame_max[n] / cue.frame_threshold[n] for n in cue.layers], axis=0)
    return float((score > 1.0).mean())


def parse_args(argv: Optional[List[str]] = None) -> CueFitConfig:
    p = argparse.ArgumentParser(prog="python -m calibration.cue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--calibration", default=None, help="Z-Mask artifact (default: the shipped one)")
    p.add_argument("--layers", default=None, help="comma-separated module names (default per model: earliest blocks)")
    p.add_argument("--split", default="train")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--pool", type=int, default=3)
    p.add_argument("--quantile", type=float, default=0.998, help="clean quantile of the per-frame max (flag)")
    p.add_argument("--cell-quantile", type=float, default=0.9999, help="clean quantile over cells (mask)")
    p.add_argument("--check-split", default="val")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default calibration/shipped/<model>_cue.safetensors")
    p.add_argument("--report-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    return CueFitConfig(model=a.model, data=a.data, calibration=a.calibration,
                        layers=[s.strip() for s in a.layers.split(",") if s.strip()] if a.layers else None,
                        split=a.split, every=a.every, pool=a.pool, quantile=a.quantile,
                        cell_quantile=a.cell_quantile, check_split=a.check_split, device=a.device, out=a.out,
                        report_dir=a.report_dir, progress=not a.quiet)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        report = fit(parse_args(argv))
    except USER_ERRORS as exc:
        return report_error(exc)
    print(f"wrote {report['artifact']}: held-out clean frames flagged {report['held_out_fpr']:.1%}"
          + (f", val {report['val_fpr']:.1%}" if "val_fpr" in report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
