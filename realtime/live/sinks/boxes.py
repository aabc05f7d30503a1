"""Detector outputs in the live pipeline: one frame's boxes, their event records and their drawing.

The compute thread turns torchvision's ``[{"boxes", "scores", "labels"}]`` into a :class:`Boxes` of
CPU arrays right away (the sinks run on another thread and must not hold device tensors); the
score threshold is applied only by the sinks, so events and video agree on what was shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

# Bright, mutually distinct colours (RGB) per detector label 1, 2, ...; none is the defense mask's
# magenta or the ground truth's yellow, so boxes never read as masks.
BOX_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (0, 170, 255),    # car
    (255, 60, 60),    # pedestrian
    (60, 230, 60),    # bicyclist
    (255, 140, 0),    # sign/symbol
    (0, 230, 230),
    (150, 90, 255),
)


@dataclass(frozen=True)
class Boxes:
    """One frame's detections at model resolution: xyxy pixels (K,4), scores (K,), labels (K,)."""
    xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def above(self, threshold: float) -> "Boxes":
        """The detections scoring at least ``threshold``, best first."""
        keep = np.nonzero(self.scores >= threshold)[0]
        keep = keep[np.argsort(-self.scores[keep], kind="stable")]
        return Boxes(self.xyxy[keep], self.scores[keep], self.labels[keep])

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def to_boxes(output: Any) -> Boxes:
    """The first image's detections from a torchvision-style output (list of per-image dicts)."""
    det = output[0] if isinstance(output, (list, tuple)) else output
    if not isinstance(det, dict) or not {"boxes", "scores", "labels"} <= set(det):
        raise TypeError(f"expected detector output [{{'boxes', 'scores', 'labels'}}], got {type(det).__name__}")

    def cpu(t: torch.Tensor, dtype: Any) -> np.ndarray:
        return t.detach().to("cpu").numpy().astype(dtype, copy=False)

    return Boxes(cpu(det["boxes"], np.float32).reshape(-1, 4), cpu(det["scores"], np.float32).reshape(-1),
                 cpu(det["labels"], np.int64).reshape(-1))


def class_name(label: int, names: Sequence[str]) -> str:
    """Name of detector label ``label`` (1-based, 0 is background); the number when unnamed."""
    return names[label - 1] if 1 <= label <= len(names) else str(label)


def box_color(label: int) -> Tuple[int, int, int]:
    return BOX_COLORS[(label - 1) % len(BOX_COLORS)]


def box_records(boxes: Boxes, names: Sequence[str]) -> List[Dict[str, Any]]:
    """Event form: ``[{"label": "car", "score": 0.91, "box": [x1, y1, x2, y2]}, ...]``, rounded."""
    return [{"label": class_name(int(lab), names), "score": round(float(s), 3),
             "box": [round(float(v), 1) for v in xyxy]}
            for xyxy, s, lab in zip(boxes.xyxy, boxes.scores, boxes.labels)]


def draw_boxes(frame: np.ndarray, boxes: Boxes, names: Sequence[str], thickness: int = 2) -> np.ndarray:
    """Rectangles in the class colour with a "name score" tag on top (in place, returns frame)."""
    h, w = frame.shape[:2]
    for xyxy, s, lab in zip(boxes.xyxy, boxes.scores, boxes.labels):
        color = box_color(int(lab))
        x0, y0, x1, y1 = (int(round(float(v))) for v in xyxy)
        x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
        y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
        cv2.rectangle(frame, (x0, y0), (x1, y1), color, thickness)
        text = f"{class_name(int(lab), names)} {float(s):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = y0 - 2 if y0 - th - base - 2 >= 0 else min(y0 + th + 2, h - 1)   # inside when no room above
        cv2.rectangle(frame, (x0, ty - th - 2), (x0 + tw + 2, ty + base - 1), color, -1)
        cv2.putText(frame, text, (x0 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return frame


__all__ = ["BOX_COLORS", "Boxes", "box_color", "box_records", "class_name", "draw_boxes", "to_boxes"]
