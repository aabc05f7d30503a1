"""Re-choose a calibration's mask settings (M~ seed threshold and mask growing) without refitting it.

    python -m calibration.refine --calibration calibration/shipped/ddrnet23_slim.safetensors \
        --model ddrnet23_slim --placement mixed --mask-threshold auto --out refined.safetensors

The statistics, layers, fusion block and lambda0 are kept; the patched calibration twins are rebuilt
exactly as ``calibration.fit`` builds them from the same options (split, ``--fit-frames``, sources,
``--placement``, seed), and ``calibration.grow.choose_grow`` picks the seed threshold on M~ and the
growing threshold with the best mask IoU on the twins lambda0 flags. Takes the two forward passes
over the twins a fit's mask step needs, not the fit's layer ranking over every candidate.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from calibration import fit as fitting
from calibration.fusion_train import MASK_THRESHOLDS
from calibration.grow import choose_grow
from calibration.patched_set import patch_frames
from calibration.select_layers import mask_to_work
from realtime.attacks import CaptureConfig
from realtime.core.cli import run_job, write_json
from realtime.core.devices import pick_device
from realtime.defenses.artifact import load_calibration
from realtime.models import build_model, fingerprint
from realtime.models.registry import model_task


def refine(calibration: str, args: argparse.Namespace) -> dict:
    t0 = time.time()
    if args.frames:
        raise ValueError("calibration.refine rebuilds labelled CamVid twins; refit footage calibrations with "
                         "calibration.fit --frames ... --grow auto")
    dev = pick_device(args.device)
    model = build_model(args.model, weights=args.weights, device=dev)
    cal = load_calibration(calibration, model)
    images, labels, _origin = fitting.calibration_frames(args)
    step = max(len(images) // args.fit_frames, 1)
    fit_idx = list(range(0, len(images), step))[: args.fit_frames]
    clean_u8 = images[fit_idx]
    hw = tuple(images.shape[-2:])
    sources = fitting.training_sources(args, hw, fingerprint(model), model_task(model))
    scene = fitting.scene_sampler(args, model, clean_u8, labels[fit_idx] if labels is not None else None)
    patched, masks, _names = patch_frames(clean_u8, sources, seed=args.seed, capture=CaptureConfig.physical(),
                                          scene=scene, placement=args.placement)
    gt_work = mask_to_work(masks, cal.config.spr.work_size)
    zm = cal.build_zmask(model)
    seeds = MASK_THRESHOLDS if args.mask_threshold == "auto" else (float(args.mask_threshold),)
    try:
        info = choose_grow(zm, clean_u8, patched, gt_work, args.batch_size, mask_thresholds=seeds)
    finally:
        zm.taps.remove()
    cfg = dataclasses.replace(cal.config, mask_threshold=info["mask_threshold"], grow_threshold=info["threshold"],
                              grow_steps=info.get("steps", cal.config.grow_steps))
    extra = {**cal.extra, "grow": info, "refined": {"from": str(calibration), "placement": args.placement,
                                                    "mask_threshold_rule": args.mask_threshold}}
    out = Path(args.out)
    dataclasses.replace(cal, config=cfg, extra=extra).save(out)
    summary = {"artifact": str(out), "from": str(calibration), "mask_threshold": cfg.mask_threshold,
               "grow_threshold": cfg.grow_threshold, "grow": info, "seconds": round(time.time() - t0, 1)}
    if args.report_dir:
        write_json(Path(args.report_dir) / "refine.json", summary)
    print(f"wrote {out}: mask threshold {cfg.mask_threshold}, grow threshold {cfg.grow_threshold} "
          f"(mask IoU on the flagged twins {info.get('iou_without')} -> {info.get('iou')})")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.refine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", required=True, help="the artifact to refine")
    own, rest = p.parse_known_args(argv)
    args = fitting.parse_args(rest)          # the fit's options describe the twin set
    if not args.out:
        raise SystemExit("error: --out is required (the refined artifact)")
    return run_job(lambda a: refine(own.calibration, a), args)


if __name__ == "__main__":
    sys.exit(main())
