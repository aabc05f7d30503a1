"""The README's picture (docs/demo_strip.png), cut from a real demo run's annotated video.

    make demo                                   # -> outputs/demo.mp4, outputs/events.jsonl
    python scripts/make_readme_figure.py        # -> docs/demo_strip.png

Three panels: the last clean frame before the poster appears (left half of the annotated frame: no
alarm), a patched frame with the alarm on and Z-Mask's mask (magenta; ground truth outlined yellow),
and the defended segmentation of that same frame (right half). The patched frame is the flagged,
alarmed frame whose mask IoU is the median of those frames (not the best one); its number and IoU are
printed in the caption.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import av
import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def caption(width: int, lines: List[str], height: int = 40) -> np.ndarray:
    bar = np.full((height, width, 3), 255, np.uint8)
    for k, text in enumerate(lines):
        cv2.putText(bar, text, (6, 16 + 17 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
    return bar


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default=str(REPO / "outputs" / "demo.mp4"))
    p.add_argument("--events", default=str(REPO / "outputs" / "events.jsonl"))
    p.add_argument("--out", default=str(REPO / "docs" / "demo_strip.png"))
    p.add_argument("--scale", type=float, default=0.75)
    a = p.parse_args()
    events = [json.loads(line) for line in Path(a.events).read_text().splitlines()]
    frames = [e for e in events if e.get("type") == "frame"]
    first_patch = next(e["frame"] for e in frames if e.get("gt_patch"))
    clean = max(e["frame"] for e in frames if e["frame"] < first_patch and not e["alarm"])
    hits = sorted((e for e in frames if e.get("gt_patch") and e["alarm"] and e["flagged"] and e.get("gt_iou")),
                  key=lambda e: e["gt_iou"])
    if not hits:
        raise SystemExit("no flagged, alarmed patched frame in the events: nothing to show")
    hit = hits[len(hits) // 2]
    want: Dict[int, np.ndarray] = {}
    with av.open(a.video) as c:
        for k, f in enumerate(c.decode(video=0)):
            if k in (clean, hit["frame"]):
                want[k] = f.to_ndarray(format="rgb24")
    w = want[clean].shape[1] // 2
    panels = [want[clean][:, :w], want[hit["frame"]][:, :w], want[hit["frame"]][:, w:]]
    texts = [[f"frame {clean}: clean, no alarm"],
             [f"frame {hit['frame']}: printed patch on the facade,", "ALARM + Z-Mask mask (yellow: ground truth)"],
             [f"frame {hit['frame']}: defended segmentation", f"(mask IoU {hit['gt_iou']:.2f}, median of flagged frames)"]]
    cols = []
    for img, t in zip(panels, texts):
        img = cv2.resize(img, (round(img.shape[1] * a.scale), round(img.shape[0] * a.scale)), interpolation=cv2.INTER_AREA)
        cols.append(np.concatenate([img, caption(img.shape[1], t)], axis=0))
    gap = np.full((cols[0].shape[0], 4, 3), 255, np.uint8)
    strip = np.concatenate([cols[0], gap, cols[1], gap, cols[2]], axis=1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"{out}: {strip.shape[1]}x{strip.shape[0]}, {out.stat().st_size / 1e3:.0f} kB "
          f"(clean frame {clean}, patched frame {hit['frame']}, mask IoU {hit['gt_iou']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
