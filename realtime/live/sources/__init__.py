"""Frame sources behind ``--source`` (the Ultralytics-style ``source=`` convention).

``cameraN`` (or a bare ``N``)  local camera N through OpenCV (live)
``rtsp://... http://...``      network stream decoded with PyAV (live)
``video.mp4``                  video file decoded with PyAV, frame-exact replay, pts timestamps
``frames/`` or ``'f/*.png'``   image folder or glob, natural sort order
``camvid:0016E5[@split]``      a CamVid sequence (clean)
``demo``                       CamVid drive with a crafted patch on a facade (ground truth known)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .base import (BlockingQueue, Frame, LatestQueue, Source, SourceDied, SourceError, check_rgb,
                   make_queue)
from .camera import CameraSource
from .camvid import CamVidSource
from .images import IMAGE_EXTS, ImageFolderSource, is_glob
from .reconnect import DEFAULT_ATTEMPTS, Reconnecting
from .video import VideoSource, is_url

_CAMERA = re.compile(r"(?:camera|cam)?(\d+)")


@dataclass(frozen=True)
class SourceOptions:
    """Knobs some source kinds need: data root, folder fps, network timeout, demo settings."""
    data: Optional[str] = None
    image_fps: float = 10.0
    timeout: float = 10.0
    model: str = "ddrnet23_slim"
    patch: Optional[str] = None
    patch_start: Optional[int] = None      # demo: first patched frame (default: DemoConfig's)
    patch_frames: Optional[int] = None     # demo: patched frames, 0 = to the end
    seed: int = 0
    reconnect: Optional[int] = None        # live sources: reconnect attempts per drop (None: the default, 5)


def source_kind(spec: str) -> str:
    """Which kind of source ``spec`` names: camera, url, camvid, demo, images or video."""
    if spec == "demo" or spec.startswith("demo:"):
        return "demo"
    if _CAMERA.fullmatch(spec.lower()):
        return "camera"
    if spec.lower().startswith("camvid:"):
        return "camvid"
    if is_url(spec):
        return "url"
    p = Path(spec)
    if is_glob(spec) or p.is_dir() or (p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        return "images"
    return "video"


def open_source(spec: str, opts: SourceOptions = SourceOptions()) -> Source:
    """Open ``spec``; every failure is a one-line SourceError."""
    kind = source_kind(spec)
    if kind == "demo":
        from realtime.live.sources.demo import DemoConfig, DemoSource
        kw: dict = {}
        if ":" in spec:                        # demo:SEQ[@split]: another sequence, split searched if absent
            seq, _, split = spec.split(":", 1)[1].partition("@")
            kw.update(sequence=seq, split=split or None)
        if opts.patch_start is not None:
            kw["patch_start"] = opts.patch_start
        if opts.patch_frames is not None:
            kw["patch_frames"] = opts.patch_frames if opts.patch_frames > 0 else 10 ** 9
        return DemoSource(DemoConfig(model=opts.model, patch=opts.patch, seed=opts.seed, **kw), opts.data)
    if kind == "camera":
        index = int(_CAMERA.fullmatch(spec.lower()).group(1))
        return _reconnecting(CameraSource(index), lambda: CameraSource(index), opts.reconnect)
    if kind == "camvid":
        return CamVidSource(spec, opts.data)
    if kind == "images":
        return ImageFolderSource(spec, opts.image_fps)
    if kind == "video" and not Path(spec).exists():
        raise SourceError(f"source '{spec}' not found: expected cameraN, a video file, an image folder or "
                          "glob, an rtsp:// or http:// URL, camvid:SEQUENCE, or demo")
    if kind == "url":
        return _reconnecting(VideoSource(spec, opts.timeout), lambda: VideoSource(spec, opts.timeout), opts.reconnect)
    return VideoSource(spec, opts.timeout)          # a file never reconnects


def _reconnecting(first: Source, reopen, attempts: Optional[int]) -> Source:
    """A live source wrapped to reconnect with back-off (``attempts`` 0: left as it is)."""
    n = DEFAULT_ATTEMPTS if attempts is None else attempts
    return Reconnecting(first, reopen, n) if n > 0 else first


__all__ = ["BlockingQueue", "CameraSource", "CamVidSource", "Frame", "ImageFolderSource", "LatestQueue",
           "Reconnecting", "Source", "SourceDied", "SourceError", "SourceOptions", "VideoSource", "check_rgb", "make_queue",
           "open_source", "source_kind"]
