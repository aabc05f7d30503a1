"""How much a patch hurts a segmenter: mIoU on the pixels outside the patch (zmask.md section 6).

    python -m realtime.attacks.evaluate --model ddrnet23_slim --patch patches/ddrnet_L.png --limit 100
    python -m realtime.attacks.evaluate --model bisenetv1 --patch p.png --placements 3 --control --json r.json

Clean and patched predictions are scored on the same pixels: for every frame and placement the patch
pixels (and void) are ignored in both, so the difference is the attack's effect on the rest of the scene.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from realtime.core.metrics import ConfusionMatrix
from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.data import CLASSES, IGNORE_INDEX, CamVid
from realtime.core.devices import autocast, describe, pick_device
from realtime.models import build_model, fingerprint, list_models

from .apply import CaptureConfig, Placement, apply_patch, load_patch_png, random_patch


@torch.no_grad()
def evaluate_patch(model: torch.nn.Module, images_u8: torch.Tensor, labels_u8: torch.Tensor,
                   patch: torch.Tensor, n_placements: int = 1, generator: Optional[torch.Generator] = None,
                   capture: Optional[CaptureConfig] = None, placement: Optional[Placement] = None,
                   batch_size: int = 8, amp: bool = False, progress: bool = False) -> Dict:
    """Clean vs patched mIoU outside the patch over ``n_placements`` draws per frame.

    ``placement`` defaults to random; ``generator`` (default seed 0) makes the placements reproducible,
    so two patches of the same size evaluated with equally seeded generators see the same positions.
    """
    dev = next(model.parameters()).device
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    placement = placement or Placement("random")
    was_training = model.training
    model.eval()
    cm_clean = ConfusionMatrix(len(CLASSES), IGNORE_INDEX, dev)
    cm_adv = ConfusionMatrix(len(CLASSES), IGNORE_INDEX, dev)
    patch = patch.to(dev)
    covered, total = 0.0, 0
    try:
        starts = range(0, len(images_u8), batch_size)
        for s in tqdm(starts, desc="eval patch", unit="batch", disable=not progress, leave=False):
            x = images_u8[s:s + batch_size].to(dev).float() / 255
            y = labels_u8[s:s + batch_size].to(dev).long()
            with autocast(dev, amp):
                clean = model(x).argmax(1)
            for _ in range(n_placements):
                patched, mask = apply_patch(x, patch, placement, capture, gen)
                with autocast(dev, amp):
                    pred = model(patched).argmax(1)
                outside = mask[:, 0] < 0.5
                cm_clean.update(clean, y, valid=outside)
                cm_adv.update(pred, y, valid=outside)
                covered += float(mask.mean()) * len(x)
                total += len(x)
    finally:
        model.train(was_training)
    c, a = cm_clean.summary(CLASSES), cm_adv.summary(CLASSES)
    return {"clean_miou": c["miou"], "patched_miou": a["miou"], "miou_drop": c["miou"] - a["miou"],
            "clean_pixel_accuracy": c["pixel_accuracy"], "patched_pixel_accuracy": a["pixel_accuracy"],
            "clean_per_class_iou": c["per_class_iou"], "patched_per_class_iou": a["per_class_iou"],
            "frames": int(len(images_u8)), "placements": int(n_placements), "patch_hw": list(patch.shape[1:]),
            "patch_area_fraction": covered / max(total, 1), "pixels_scored": a["pixels"]}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m realtime.attacks.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(list_models('segmentation'))}")
    p.add_argument("--weights", default="default")
    p.add_argument("--patch", required=True, help="patch PNG written by realtime.attacks.craft")
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="only the first N frames")
    p.add_argument("--placements", type=int, default=1, help="random placements per frame")
    p.add_argument("--capture", choices=("none", "physical"), default="none")
    p.add_argument("--control", action="store_true", help="also score a uniform-noise patch of the same size")
    p.add_argument("--seed", type=int, default=0, help="placement (and control patch) seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.model not in list_models('segmentation'):
            raise KeyError(f"unknown model '{args.model}'; available: {', '.join(list_models('segmentation'))}")
        patch, meta = load_patch_png(args.patch)
        ds = CamVid(args.data, args.split)
        dev = pick_device(args.device)
        model = build_model(args.model, weights=args.weights, device=dev)
    except USER_ERRORS as exc:
        return report_error(exc)
    fp = fingerprint(model)
    if meta.get("kind") == "eot" and meta.get("fingerprint") not in (None, fp):
        print(f"warning: patch was crafted on {meta.get('model')} ({meta.get('fingerprint')}), evaluating on "
              f"{args.model} ({fp}): a transfer attack", file=sys.stderr)
    idx = range(min(len(ds), args.limit)) if args.limit else None
    images, labels = ds.to_tensors(idx)
    capture = CaptureConfig.physical() if args.capture == "physical" else None
    kw = dict(n_placements=args.placements, capture=capture, batch_size=args.batch_size, amp=args.amp, progress=True)
    res = evaluate_patch(model, images, labels, patch, generator=torch.Generator().manual_seed(args.seed), **kw)
    res.update(model=args.model, fingerprint=fp, patch=str(args.patch), patch_meta={k: v for k, v in meta.items()
               if k not in ("history", "config")}, split=args.split, capture=args.capture, env=describe(dev))
    print(f"{args.model} on {len(images)} {args.split} frames x {args.placements} placement(s), patch "
          f"{res['patch_hw'][0]}x{res['patch_hw'][1]}: mIoU outside patch clean {res['clean_miou']:.4f}, "
          f"patched {res['patched_miou']:.4f} (drop {res['miou_drop']:.4f})")
    if args.control:
        ctrl = random_patch(tuple(patch.shape[1:]), torch.Generator().manual_seed(args.seed))
        r = evaluate_patch(model, images, labels, ctrl, generator=torch.Generator().manual_seed(args.seed), **kw)
        res["control"] = {k: r[k] for k in ("clean_miou", "patched_miou", "miou_drop", "patched_pixel_accuracy")}
        print(f"random control patch: clean {r['clean_miou']:.4f}, patched {r['patched_miou']:.4f} "
              f"(drop {r['miou_drop']:.4f})")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
