"""Segmentation accuracy: per-class IoU and mIoU (void ignored) of a registered model on a CamVid split.

    python -m benchmarks.accuracy --model ddrnet23_slim --split val --json out.json
    python -m benchmarks.accuracy --model ddrnet23_slim --weights runs/loso_0001TP/best.pt \
        --split train,val --sequence 0001TP                  # a leave-one-sequence-out fold's drive

``--split`` takes several splits (pooled); ``--sequence`` keeps only those sequences; ``--per-sequence``
adds each sequence's own mIoU to the result (a val frame counts as its sequence, 0016E5).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict

from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.data import CamVid
from realtime.data.folds import load_frames
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models, model_arg
from realtime.models.evaluate import evaluate


def format_table(result: Dict) -> str:
    lines = [f"{'class':<12} IoU"]
    lines += [f"{k:<12} {v:.4f}" for k, v in result["per_class_iou"].items()]
    lines.append(f"{'mIoU':<12} {result['miou']:.4f}   (pixel acc {result['pixel_accuracy']:.4f}, "
                 f"{result['frames']} frames at {result['size'][0]}x{result['size'][1]})")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=model_arg,
                   help="a registered name ({}) or torchvision:NAME / package.module:factory".format(", ".join(list_models())))
    p.add_argument("--weights", default="default", help="checkpoint path, or 'default' for the shipped weights")
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="val", help="split folder(s) present in the data directory, comma-separated")
    p.add_argument("--sequence", default=None, help="only these sequences (comma-separated)")
    p.add_argument("--per-sequence", action="store_true", help="also score each sequence on its own")
    p.add_argument("--size", default=None, help="evaluate at HxW (default: the frames' own size)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="only the first N frames")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on GPU")
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    splits = [s for s in args.split.split(",") if s]
    include = [s for s in args.sequence.split(",") if s] if args.sequence else None
    try:
        frames = load_frames(args.data, splits, include=include, limit=args.limit, progress=True)
        root = CamVid(args.data, splits[0]).root
        dev = pick_device(args.device)
        model = build_model(args.model, weights=args.weights, device=dev)
    except USER_ERRORS as exc:
        return report_error(exc)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    t0 = time.time()
    res = evaluate(model, frames.images, frames.labels, args.batch_size, size, args.amp, progress=True)
    if args.per_sequence:
        res["per_sequence"] = {}
        for name in frames.names():
            part = frames.of(name)
            r = evaluate(model, part.images, part.labels, args.batch_size, size, args.amp)
            res["per_sequence"][name] = {"miou": r["miou"], "frames": r["frames"]}
    res.update(model=args.model, weights=str(args.weights), split=args.split, sequences=frames.names(),
               data=str(root), fingerprint=fingerprint(model), seconds=round(time.time() - t0, 2), env=describe(dev))
    print(format_table(res))
    for name, r in res.get("per_sequence", {}).items():
        print(f"{name:<12} {r['miou']:.4f}   ({r['frames']} frames)")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
