"""Rebuild the demo's embedded clip (realtime/live/sources/assets/demo_0016E5/) from CamVid.

    python scripts/make_demo_clip.py                    # CamVid from --data / $REALTIME_DATA / ../shared
    python scripts/make_demo_clip.py --crf 16 --out /tmp/clip

Deterministic: single-threaded libx264 with fixed options and LZMA for the labels, so the same CamVid
files and library versions give the committed bytes (clip.json records sizes, versions and SHA-256).
clip.json also records the poster track (quads per frame) the full demo renderer computes on the original
frames with the default settings, so the embedded demo shows the same posters. The origin / licence note (README.md in the clip folder) is kept as it is.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from realtime.data import CamVid, resolve_data_dir
from realtime.live.sources.demo import DemoConfig, DemoSource
from realtime.live.sources.demo_clip import CLIP_DIR, CLIP_SEQUENCE, CLIP_SPLIT, DEFAULT_CRF, build_clip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CamVid root (default: the usual lookup)")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="x264 constant rate factor (lower = larger, closer)")
    p.add_argument("--out", default=str(CLIP_DIR))
    a = p.parse_args()
    root = str(resolve_data_dir(a.data))
    view = CamVid(root, CLIP_SPLIT).sequence(CLIP_SEQUENCE)
    # the full renderer's poster geometry on the original frames, for the default demo settings
    cfg = DemoConfig(sequence=CLIP_SEQUENCE, split=CLIP_SPLIT)
    src = DemoSource(cfg, root)
    for _ in src:
        pass
    track = {"key": cfg.track_key(), "quads": [None if q is None else q.tolist() for q in src.quads],
             "posters": src.poster_ids}
    meta = build_clip(view, a.out, crf=a.crf, poster_track=track)
    sizes = {k: (Path(a.out) / k).stat().st_size
             for k in ("frames.mp4", "labels.xz", "clip.json")}
    print(json.dumps({"frames": len(meta["frames"]), "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
