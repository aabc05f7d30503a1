"""Write a folder of frames (e.g. CamVid train images, labels left behind) as one H.264 video.

    python scripts/frames_to_video.py ../shared/datasets/camvid/train footage.mp4 --fps 10

Used by the "your model, your footage" example: calibration then reads the video as a user's own
unlabeled camera footage would be read (``calibration.fit --frames footage.mp4``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

from realtime.live.sinks.video import VideoWriter

EXTS = (".png", ".jpg", ".jpeg")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--fps", type=float, default=10.0)
    a = p.parse_args(argv)
    files = sorted(f for f in Path(a.folder).iterdir() if f.suffix.lower() in EXTS)
    if not files:
        print(f"error: no images in {a.folder}", file=sys.stderr)
        return 2
    writer = VideoWriter(Path(a.out), fps=a.fps)
    try:
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            writer.write(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    finally:
        writer.close()
    print(f"wrote {len(files)} frames to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
