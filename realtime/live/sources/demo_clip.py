"""The demo's embedded clip: CamVid val ``0016E5`` packed small enough to ship in the repository
(``assets/demo_0016E5/``).

The ``demo`` source renders its poster from clean frames and their label maps (placement, facade
tracking, occlusion; see ``demo.py``). Without CamVid on the machine it reads them from here instead:

``frames.mp4``   the 101 clean frames, H.264 (libx264, yuv420p, ``crf`` in ``clip.json``), 480x360, 15 fps
``labels.xz``    the 101 label maps, uint8 0..11 (11 = void), stacked and LZMA-compressed
``clip.json``    sequence, split, CamVid frame numbers, shapes, encoder settings, SHA-256 of both files,
                 and the poster track (quads per frame) the full renderer computed on the original frames
``README.md``    origin and licence (CamVid, research use)

The patch itself is never stored compressed: it is rendered from the lossless library PNG at run time,
so only the background went through the video codec. ``build_clip`` (``scripts/make_demo_clip.py``)
rebuilds the clip from CamVid; the same inputs and library versions give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import av
import numpy as np

from realtime.data.camvid import IGNORE_INDEX

from .base import SourceError

CLIP_DIR = Path(__file__).resolve().parent / "assets" / "demo_0016E5"
CLIP_SEQUENCE, CLIP_SPLIT = "0016E5", "val"
DEFAULT_CRF = 16


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ClipView:
    """The embedded sequence with the interface of ``realtime.data.SequenceView``: ``frames`` (CamVid
    frame numbers), ``len()``, and iteration yielding ``(frame_number, image uint8 HxWx3, label int64 HxW)``."""

    def __init__(self, root: Path = CLIP_DIR) -> None:
        self.root = Path(root)
        meta_path = self.root / "clip.json"
        if not meta_path.is_file():
            raise SourceError(f"embedded demo clip not found ({meta_path}); rebuild it with "
                              "scripts/make_demo_clip.py or pass --data /path/to/camvid")
        self.meta: Dict[str, Any] = json.loads(meta_path.read_text())
        self.sequence, self.split = self.meta["sequence"], self.meta["split"]
        n, h, w = self.meta["labels_shape"]
        try:
            raw = lzma.decompress((self.root / "labels.xz").read_bytes())
        except (OSError, lzma.LZMAError) as exc:
            raise SourceError(f"embedded demo clip: cannot read labels.xz: {exc}") from None
        if len(raw) != n * h * w:
            raise SourceError(f"embedded demo clip: labels.xz holds {len(raw)} bytes, expected {n}x{h}x{w}")
        self.labels = np.frombuffer(raw, np.uint8).reshape(n, h, w)
        self.video = self.root / "frames.mp4"
        if len(self.meta["frames"]) != n:
            raise SourceError("embedded demo clip: clip.json lists a frame count unlike the labels'")

    def __len__(self) -> int:
        return len(self.meta["frames"])

    @property
    def frames(self) -> List[int]:
        return list(self.meta["frames"])

    def poster_track(self, key: Dict[str, Any]) -> Optional[List[Tuple[Optional[list], int]]]:
        """Per frame ``(quad or None, poster number)`` recorded from the full renderer, if it was
        recorded with exactly these settings (``DemoConfig.track_key``); else None (track anew)."""
        rec = self.meta.get("poster_track")
        if not rec or rec["key"] != key:
            return None
        return list(zip(rec["quads"], rec["posters"]))

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        try:
            container = av.open(str(self.video))
        except (OSError, av.error.FFmpegError) as exc:
            raise SourceError(f"embedded demo clip: cannot open {self.video}: {exc}") from None
        try:
            k = -1
            for k, frame in enumerate(container.decode(video=0)):
                if k >= len(self):
                    break
                yield self.meta["frames"][k], frame.to_ndarray(format="rgb24"), self.labels[k].astype(np.int64)
            if k + 1 < len(self):
                raise SourceError(f"embedded demo clip: {self.video.name} decoded {k + 1} of {len(self)} frames")
        finally:
            container.close()


def build_clip(view, out_dir: Path = CLIP_DIR, crf: int = DEFAULT_CRF, fps: float = 15.0,
               sequence: str = CLIP_SEQUENCE, split: str = CLIP_SPLIT,
               poster_track: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``frames.mp4``, ``labels.xz`` and ``clip.json`` for ``view`` (a CamVid SequenceView).

    ``poster_track`` (``{"key": DemoConfig.track_key(), "quads": [...], "posters": [...]}``, one entry per
    frame) is the full renderer's geometry on the original frames, replayed when the settings match.

    Single-threaded x264 and fixed encoder options, so a rebuild with the same library versions
    reproduces the committed bytes (``clip.json`` records the versions).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers: List[int] = []
    labels: List[np.ndarray] = []
    video = out_dir / "frames.mp4"
    container = av.open(str(video), mode="w")
    stream: Optional[Any] = None
    try:
        for number, img, lab in view:
            if stream is None:
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = img.shape[1], img.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryslow", "threads": "1"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
            numbers.append(int(number))
            lab8 = lab.astype(np.int64)
            lab8[(lab8 < 0) | (lab8 > IGNORE_INDEX)] = IGNORE_INDEX
            labels.append(lab8.astype(np.uint8))
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    finally:
        container.close()
    stack = np.ascontiguousarray(np.stack(labels))
    (out_dir / "labels.xz").write_bytes(lzma.compress(stack.tobytes(), preset=9 | lzma.PRESET_EXTREME))
    meta = {"sequence": sequence, "split": split, "frames": numbers, "fps": fps,
            "labels_shape": list(stack.shape), "labels_dtype": "uint8", "void": IGNORE_INDEX,
            "video": {"codec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": "veryslow",
                      "pyav": av.__version__},
            "sha256": {"frames.mp4": _sha256(video), "labels.xz": _sha256(out_dir / "labels.xz")},
            **({"poster_track": poster_track} if poster_track else {})}
    (out_dir / "clip.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


__all__ = ["CLIP_DIR", "CLIP_SEQUENCE", "CLIP_SPLIT", "ClipView", "build_clip"]
