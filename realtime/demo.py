"""Demo: segment the CamVid val sequence with a shipped model and write an overlay video.

    python -m realtime.demo --model ddrnet23_slim --output outputs/demo.mp4

Left: the camera frame with the predicted classes blended in; right: the ground-truth labels.
Prints per-frame latency and the sequence mIoU. (The defended live pipeline will replace this
as the main job; the demo already runs on the same models and data.)
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from realtime.core.metrics import ConfusionMatrix
from realtime.core.cli import run_job
from realtime.data import CLASSES, IGNORE_INDEX, CamVid
from realtime.core.devices import pick_device
from realtime.models import build_model, list_models
from realtime.live.sinks.video import VideoWriter, overlay_segmentation, put_text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m realtime.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ddrnet23_slim", choices=list_models("segmentation"))
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="val")
    p.add_argument("--sequence", default="0016E5")
    p.add_argument("--output", default="outputs/demo.mp4")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--fps", type=float, default=4.0, help="playback rate of the written video")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    dev = pick_device(args.device)
    model = build_model(args.model, device=dev)
    seq = CamVid(args.data, args.split).sequence(args.sequence)
    cm = ConfusionMatrix(len(CLASSES), IGNORE_INDEX)
    times = []
    n = len(seq) if args.max_frames is None else min(len(seq), args.max_frames)
    with VideoWriter(args.output, fps=args.fps) as out:
        for k, (frame_no, img, lab) in enumerate(tqdm(seq, total=n, desc=f"demo {args.sequence}", unit="frame")):
            if k >= n:
                break
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).to(dev)
            t0 = time.perf_counter()
            pred = model(x).argmax(1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
            pred = pred[0].cpu()
            cm.update(pred, torch.from_numpy(lab))
            left = put_text(overlay_segmentation(img, pred.numpy()),
                            f"{args.model}  frame {frame_no}  {times[-1]:.0f} ms")
            right = put_text(overlay_segmentation(img, lab), "ground truth")
            out.write(np.concatenate([left, right], axis=1))
    summary = {"model": args.model, "sequence": args.sequence, "frames": n, "output": args.output,
               "device": str(dev), "median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
               "sequence_miou": cm.summary(CLASSES)["miou"]}
    return summary


def main(argv=None) -> int:
    return run_job(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
