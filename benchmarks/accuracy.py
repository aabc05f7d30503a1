"""Segmentation accuracy: per-class IoU and mIoU (void ignored) of a registered model on a CamVid split.

    python -m benchmarks.accuracy --model ddrnet23_slim --split val --json out.json
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, Optional, Tuple

import torch
from tqdm import tqdm

from realtime.core.metrics import ConfusionMatrix
from realtime.core.cli import USER_ERRORS, report_error, write_json
from realtime.data import CLASSES, IGNORE_INDEX, CamVid
from realtime.data.augment import resize_batch
from realtime.core.devices import autocast, describe, pick_device
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
    p.add_argument("--split", default="val", help="any split folder present in the data directory")
    p.add_argument("--size", default=None, help="evaluate at HxW (default: the frames' own size)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="only the first N frames")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on GPU")
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ds = CamVid(args.data, args.split)
        dev = pick_device(args.device)
        model = build_model(args.model, weights=args.weights, device=dev)
    except USER_ERRORS as exc:
        return report_error(exc)
    idx = range(min(len(ds), args.limit)) if args.limit else None
    images, labels = ds.to_tensors(idx, progress=True)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    t0 = time.time()
    res = evaluate(model, images, labels, args.batch_size, size, args.amp, progress=True)
    res.update(model=args.model, weights=str(args.weights), split=args.split, data=str(ds.root),
               fingerprint=fingerprint(model), seconds=round(time.time() - t0, 2), env=describe(dev))
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
