"""Annotated-video sink: H.264 MP4 through PyAV (falls back to MPEG-4 Part 2 if libx264 is missing).

The container is always closed (and so playable) even when the producer dies mid-stream: use the
writer as a context manager.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import av
import cv2
import numpy as np

from realtime.data.camvid import PALETTE
from realtime.live.sinks.boxes import Boxes, draw_boxes


def overlay_segmentation(frame: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a class map (HxW, CamVid indices) over an RGB uint8 frame."""
    color = PALETTE[np.clip(label, 0, len(PALETTE) - 1)]
    return (frame.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)


def put_text(frame: np.ndarray, text: str, org=(8, 22), scale: float = 0.6,
             color=(255, 255, 255)) -> np.ndarray:
    """White text on a dark box so it stays readable on any background (in place, returns frame)."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = org
    cv2.rectangle(frame, (x - 4, y - th - 4), (x + tw + 4, y + base + 2), (0, 0, 0), -1)
    cv2.putText(frame, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
    return frame


class VideoWriter:
    """Write RGB uint8 frames of one fixed size to a video file."""

    def __init__(self, path: str | Path, fps: float = 10.0, codec: Optional[str] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = Fraction(fps).limit_denominator(1000)
        self.codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        self._container = av.open(str(self.path), mode="w")
        self._stream = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {frame.shape} {frame.dtype}")
        h, w = frame.shape[:2]
        if self._stream is None:
            self._stream = self._container.add_stream(self.codec, rate=self.fps)
            self._stream.width, self._stream.height = w - w % 2, h - h % 2   # yuv420p needs even sizes
            self._stream.pix_fmt = "yuv420p"
        frame = frame[: self._stream.height, : self._stream.width]
        if frame.shape[:2] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size {frame.shape[:2]} differs from the stream's "
                             f"{(self._stream.height, self._stream.width)}")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


BANNER_COLORS = {"alarm": (200, 30, 30), "clear": (30, 140, 60), "unsafe": (90, 0, 90), "off": (70, 70, 70)}


def draw_mask(frame: np.ndarray, mask: np.ndarray, color=(255, 0, 255), alpha: float = 0.55) -> np.ndarray:
    """Tint the pixels of a boolean HxW mask and outline it (in place, returns frame)."""
    if mask is None or not mask.any():
        return frame
    tint = np.array(color, np.float32)
    frame[mask] = (frame[mask].astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(frame, contours, -1, color, 1, cv2.LINE_AA)
    return frame


def draw_outline(frame: np.ndarray, mask: np.ndarray, color=(255, 230, 0)) -> np.ndarray:
    """Outline a boolean mask without tinting it (ground truth), in place."""
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(frame, contours, -1, color, 1, cv2.LINE_AA)
    return frame


def annotate(image: np.ndarray, label: Optional[np.ndarray], masked: Optional[np.ndarray],
             gt_mask: Optional[np.ndarray], state: str, info: str, banner: str,
             boxes: Optional[Boxes] = None, class_names: Sequence[str] = ()) -> np.ndarray:
    """Two panels under a banner: camera frame with the defense mask (magenta) and ground truth
    (yellow outline), and the defended output: the segmentation (``label``) or, for a detector, the
    ``boxes`` to show (already thresholded) drawn with ``class_names``; ``state`` picks the banner
    colour (alarm/clear/unsafe/off). An unsafe frame (fail-closed) shows no output at all."""
    left = draw_outline(draw_mask(image.copy(), masked), gt_mask)
    if label is None and boxes is None:
        right = np.full_like(image, 40)
        put_text(right, "NO OUTPUT (defense failed, fail-closed)", (8, image.shape[0] // 2), 0.5)
    elif label is not None:
        right = overlay_segmentation(image, label)
        draw_mask(right, masked, color=(0, 0, 0), alpha=0.6)
    else:   # the detector saw the masked pixels filled in: show them blacked out, boxes on top
        right = draw_boxes(draw_mask(image.copy(), masked, color=(0, 0, 0), alpha=0.6), boxes, class_names)
    body = np.concatenate([left, right], axis=1)
    bar = np.zeros((28, body.shape[1], 3), np.uint8)
    bar[:] = BANNER_COLORS.get(state, BANNER_COLORS["off"])
    cv2.putText(bar, banner, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(info, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    cv2.putText(bar, info, (max(body.shape[1] - tw - 8, 260), 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, body], axis=0)
