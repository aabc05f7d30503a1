"""Measure a Z-Mask calibration on held-out frames: detection and masking per patch condition.

    python -m calibration.evaluate --model ddrnet23_slim --split val --json out.json

Conditions: clean, random-noise L, and every crafted library patch of the model. Each patched frame
gets the patch at a seeded random place through the physical-capture simulation. Reported per
condition: AUC of d against the clean frames, TPR at the calibrated lambda0, the clean FPR, and the
IoU between Z-Mask's binary mask and the true patch mask (on flagged frames, and over all patched
frames counting unflagged ones as 0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from kernels.backend import BACKENDS, heatmap_backend
from realtime.defenses.artifact import load_calibration
from calibration.fit import LIBRARY
from calibration.patched_set import library_patches, make_sources, patch_frames
from calibration.plots import plot_heatmaps, plot_roc
from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.attacks import CaptureConfig
from realtime.data import CamVid
from realtime.defenses.zmask_defense import ZMaskDefense
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models, model_arg, model_slug


@torch.no_grad()
def run_zmask(zm, frames: torch.Tensor, batch_size: int, desc: str) -> Dict[str, torch.Tensor]:
    """Z-Mask over ``frames`` through the one orchestration the live pipeline runs (``ZMaskDefense``)."""
    dev = zm.mean_color.device
    defense = ZMaskDefense(zm)
    d, masks, keep, gate = [], [], [], []
    for s in tqdm(range(0, len(frames), batch_size), desc=desc, unit="batch", leave=False):
        x = frames[s:s + batch_size].to(dev)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        r = defense(x)
        h_s, h_d, soft = r.extras["h_s"], r.extras["h_d"], r.extras["soft_mask"]
        d.append(r.score.float().cpu())
        masks.append(r.mask.cpu())
        gate.append(zm.fusion.gate(h_d).cpu())
        keep.append({"h_s": h_s.cpu(), "h_d": h_d.cpu(), "soft": soft.cpu()} if s == 0 else None)
    return {"d": torch.cat(d), "mask": torch.cat(masks), "gate": torch.cat(gate), "first": keep[0]}


def gate_stats(gate: torch.Tensor, gt_work: torch.Tensor | None = None) -> Dict[str, float]:
    """How selective the learned region-of-interest gate g is (the authors' ended up ~1 everywhere)."""
    out = {"gate_mean": float(gate.mean()), "gate_frac_below_0.5": float((gate < 0.5).float().mean())}
    if gt_work is not None:
        inside = gt_work > 0.5
        out["gate_mean_inside_patch"] = float(gate[inside].mean()) if inside.any() else None
        out["gate_mean_outside_patch"] = float(gate[~inside].mean())
    return out


def mask_iou(keep_mask: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-frame IoU of the masked region (keep == 0) with the true patch (gt == 1)."""
    a = keep_mask < 0.5
    b = gt > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return inter / union.clamp_min(1)


def evaluate(args: argparse.Namespace) -> Dict:
    dev = pick_device(args.device)
    model = build_model(args.model, device=dev)
    cal_path = args.calibration or Path("calibration") / "shipped" / f"{model_slug(args.model)}.safetensors"
    cal = load_calibration(cal_path, model)
    zm = cal.build_zmask(model, heatmap_backend=heatmap_backend(getattr(args, "kernels", "auto"))).eval()
    ds = CamVid(args.data, args.split)
    images, _ = ds.to_tensors(range(min(len(ds), args.limit or len(ds))), progress=True)
    hw = tuple(images.shape[-2:])
    crafted = library_patches(Path(args.patches), args.model, fingerprint(model), kinds=("eot",))
    sources = [s for s in make_sources(hw, crafted, seed=args.seed, half_contrast=False) if s.name != "random-S"
               and s.name != "random-M"]
    clean = run_zmask(zm, images, args.batch_size, "clean")
    lam = cal.config.lambda0
    d_clean = clean["d"].numpy()
    res: Dict = {"model": args.model, "calibration": str(cal_path), "split": args.split, "frames": len(images),
                 "lambda0": lam, "shallow": list(cal.config.shallow), "deep": list(cal.config.deep),
                 "kernels": zm.heatmap_backend, "clean_fpr": float((d_clean > lam).mean()), "clean_gate": gate_stats(clean["gate"]),
                 "conditions": {}, "env": describe(dev)}
    curves = {}
    examples: List = []
    for src in sources:
        patched, gt, _ = patch_frames(images, [src], seed=args.seed + 1, capture=CaptureConfig.physical())
        out = run_zmask(zm, patched, args.batch_size, src.name)
        d = out["d"].numpy()
        flagged = d > lam
        iou = mask_iou(out["mask"], gt)
        y = np.r_[np.zeros(len(d_clean)), np.ones(len(d))]
        fpr, tpr, _ = roc_curve(y, np.r_[d_clean, d])
        auc = float(roc_auc_score(y, np.r_[d_clean, d]))
        res["conditions"][src.name] = {
            "kind": src.kind, "auc": auc, "tpr_at_lambda0": float(flagged.mean()),
            "mask_iou_flagged": float(iou[torch.from_numpy(flagged)].mean()) if flagged.any() else None,
            "mask_iou_all": float((iou * torch.from_numpy(flagged)).mean()),
            "mean_d": float(d.mean()),
            **gate_stats(out["gate"], torch.nn.functional.adaptive_avg_pool2d(gt, cal.config.spr.work_size))}
        curves[src.name] = {"fpr": fpr, "tpr": tpr, "auc": auc,
                            "chosen": {"fpr": res["clean_fpr"], "tpr": float(flagged.mean())}}
        examples.append((src.name, patched[:1], gt[:1], out["first"], float(d[0])))
    report = Path(args.report_dir or Path("benchmarks") / "results" / "calibration" / args.model)
    plot_roc(curves, report / f"roc_{args.split}.png",
             f"{args.model}: d on {len(images)} clean vs patched {args.split} frames (dot: lambda0)")
    frames = torch.cat([images[:1].float() / 255] + [e[1] for e in examples])
    first = clean["first"]
    cat = lambda key: torch.cat([first[key][:1]] + [e[3][key][:1] for e in examples])  # noqa: E731
    gts = torch.nn.functional.adaptive_avg_pool2d(torch.cat([torch.zeros_like(examples[0][2])] +
                                                            [e[2] for e in examples]), cal.config.spr.work_size)
    plot_heatmaps(frames, cat("h_s"), cat("h_d"), cat("soft"), gts, [float(d_clean[0])] + [e[4] for e in examples],
                  lam, report / f"heatmaps_{args.split}.png", titles=["clean"] + [e[0] for e in examples])
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calibration.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=model_arg,
                   help="a registered name ({}) or torchvision:NAME / package.module:factory".format(", ".join(list_models())))
    p.add_argument("--calibration", default=None, help="artifact (default: the shipped one)")
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="val", help="any split present in the data directory")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--patches", default=str(LIBRARY))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", default="auto", choices=BACKENDS,
                   help="Z-Mask heatmaps: auto (the fused CUDA kernels on CUDA, the C kernel on CPU, each after a "
                        "one-time parity self-check, else the plain-torch reference), fused (a kernel or "
                        "an error), reference")
    p.add_argument("--report-dir", default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        res = evaluate(args)
    except USER_ERRORS as exc:
        return report_error(exc)
    print(json.dumps(res, indent=2))
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
