"""``cameraN``: a local camera through OpenCV (V4L2 on Linux). Live: timestamps are capture times."""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional

import cv2
import numpy as np

from .base import Frame, Source, SourceDied, SourceError, check_rgb


class CameraSource(Source):
    """OpenCV ``VideoCapture(index)``; a camera that cannot be opened is a clear SourceError."""

    live = True

    def __init__(self, index: int, width: Optional[int] = None, height: Optional[int] = None) -> None:
        self.index = index
        self.name = f"camera{index}"
        dev = f"/dev/video{index}"
        if os.name == "posix" and not os.path.exists(dev):
            raise SourceError(f"camera {index} not found: {dev} does not exist (is a camera connected?)")
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"camera {index} could not be opened ({dev} busy or not a capture device)")
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else None
        self._cap: Optional[cv2.VideoCapture] = cap

    def __iter__(self) -> Iterator[Frame]:
        cap = self._cap
        if cap is None:
            raise SourceError(f"{self.name} is closed")
        t0 = time.monotonic()
        k = 0
        while True:
            ok, bgr = cap.read()
            if not ok or bgr is None:
                if k == 0:
                    raise SourceError(f"{self.name} opened but delivered no frame")
                raise SourceDied(f"{self.name} stopped delivering frames after {k} frames")
            rgb = check_rgb(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else bgr,
                            f"{self.name} frame {k}")
            yield Frame(index=k, image=np.ascontiguousarray(rgb), timestamp=time.monotonic() - t0)
            k += 1

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
