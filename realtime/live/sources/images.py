"""An image folder or glob, replayed in natural sort order (frame2 before frame10).

Every file's header is checked when the source opens, so a folder with a grayscale frame, frames of
different sizes or an unreadable file fails before any processing with one clear message.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Iterator, List

import numpy as np
from PIL import Image

from .base import Frame, Source, SourceDied, SourceError, check_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def natural_key(path: Path) -> List[object]:
    """Sort key that orders embedded numbers numerically."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


class ImageFolderSource(Source):
    """Frames from ``spec`` (a directory or a glob pattern); timestamps are ``index / fps``."""

    def __init__(self, spec: str, fps: float = 10.0) -> None:
        self.spec = spec
        self.fps = fps
        if is_glob(spec):
            files = [Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_EXTS]
            self.name = spec
        elif Path(spec).is_file():
            files, self.name = [Path(spec)], Path(spec).name
        else:
            root = Path(spec)
            if not root.is_dir():
                raise SourceError(f"image folder {spec} not found")
            files = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
            self.name = root.name or spec
        if not files:
            raise SourceError(f"no images ({', '.join(IMAGE_EXTS)}) found in {spec}")
        self.files = sorted(files, key=natural_key)
        self.length = len(self.files)
        self._check_headers()

    def _check_headers(self) -> None:
        first = None
        for p in self.files:
            try:
                with Image.open(p) as im:
                    size, mode = im.size, im.mode
            except Exception as exc:  # PIL raises several unrelated types for bad files
                raise SourceError(f"cannot read image {p}: {' '.join(str(exc).split())}") from None
            if mode in _GRAY_MODES:
                raise SourceError(f"image {p.name} in {self.spec} is grayscale (mode {mode}); "
                                  "the models need RGB colour frames")
            if first is None:
                first = (p, size)
                if min(size) < 32:
                    raise SourceError(f"image {p.name} is only {size[0]}x{size[1]} pixels; need at least 32x32")
            elif size != first[1]:
                raise SourceError(f"image {p.name} is {size[0]}x{size[1]} but {first[0].name} is "
                                  f"{first[1][0]}x{first[1][1]}: all frames of a sequence must share one size")

    def __iter__(self) -> Iterator[Frame]:
        for k, p in enumerate(self.files):
            try:
                with Image.open(p) as im:
                    arr = np.array(im.convert("RGB") if im.mode not in ("RGB", "RGBA") else im)
            except Exception as exc:  # file changed or corrupt body after the header check
                err = SourceDied if k else SourceError
                raise err(f"cannot read image {p}: {' '.join(str(exc).split())}") from None
            yield Frame(index=k, image=check_rgb(arr, f"image {p.name}"), timestamp=k / self.fps,
                        meta={"file": p.name})
