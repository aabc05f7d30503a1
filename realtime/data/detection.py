"""CamVid as a detection dataset: boxes derived from the segmentation label maps (issue 9, part 1).

CamVid has no instance labels, so an object is an 8-connected component of one "thing" class in the
label map: car, pedestrian, bicyclist, sign/symbol (the classes a camera detector is asked for;
stuff classes such as road or building make no boxes). A component smaller than ``min_area`` pixels
(default 100 at 360x480, ~0.06 % of the frame: a pedestrian ~6x17 px far away) is dropped: below
that the boxes are mostly label noise and slivers cut by occluders. Known limits: touching instances
of one class merge into one box (a row of parked cars), and an object split by an occluder (a pole
in front of a car) gives two boxes.

Targets follow torchvision's detection convention: ``boxes`` float (K,4) ``x1, y1, x2, y2`` in pixels
(x2/y2 exclusive), ``labels`` int64 (K,) with 0 reserved for the background, so car = 1,
pedestrian = 2, bicyclist = 3, sign/symbol = 4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from .camvid import CLASSES, CamVid

DETECTION_CLASSES: Tuple[str, ...] = ("car", "pedestrian", "bicyclist", "sign/symbol")


@dataclass(frozen=True)
class BoxConfig:
    """Which segmentation classes become objects, the minimum component area and the connectivity."""
    classes: Tuple[str, ...] = DETECTION_CLASSES
    min_area: int = 100
    connectivity: int = 8

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown:
            raise ValueError(f"unknown CamVid classes {unknown}; choose from {CLASSES}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.min_area < 1:
            raise ValueError(f"min_area must be >= 1 pixel, got {self.min_area}")

    @property
    def names(self) -> Tuple[str, ...]:
        """Detection label names, index = label id (0 = background)."""
        return ("background", *self.classes)


def boxes_from_label(label: np.ndarray, cfg: BoxConfig = BoxConfig()) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes (K,4) float32 xyxy, labels (K,) int64) of the connected components of ``label`` (HxW ints)."""
    if label.ndim != 2:
        raise ValueError(f"expected an HxW label map, got shape {label.shape}")
    boxes: List[List[float]] = []
    labels: List[int] = []
    for det_id, name in enumerate(cfg.classes, start=1):
        mask = (label == CLASSES.index(name)).astype(np.uint8)
        if not mask.any():
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=cfg.connectivity)
        for x, y, w, h, area in stats[1:]:                 # row 0 is the background component
            if area >= cfg.min_area:
                boxes.append([float(x), float(y), float(x + w), float(y + h)])
                labels.append(det_id)
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))


class CamVidDetection(torch.utils.data.Dataset):
    """``(image (3,H,W) float in [0,1], target dict)`` per CamVid frame, targets as torchvision expects."""

    def __init__(self, root: Optional[str] = None, split: str = "train", cfg: BoxConfig = BoxConfig()) -> None:
        self.seg = CamVid(root, split)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.seg)

    def target(self, index: int) -> Dict[str, torch.Tensor]:
        """The detection target of frame ``index`` (boxes, labels, area, iscrowd, image_id)."""
        _, label = self.seg.load(index)
        boxes, labels = boxes_from_label(label, self.cfg)
        b = torch.from_numpy(boxes)
        return {"boxes": b, "labels": torch.from_numpy(labels),
                "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
                "iscrowd": torch.zeros(len(labels), dtype=torch.int64), "image_id": torch.tensor(index)}

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image, _ = self.seg.load(index)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return x, self.target(index)

    def class_counts(self, indices: Optional[Sequence[int]] = None) -> Dict[str, int]:
        """Boxes per class over ``indices`` (default: every frame)."""
        counts = {name: 0 for name in self.cfg.classes}
        for i in (range(len(self)) if indices is None else indices):
            for lab in self.target(i)["labels"].tolist():
                counts[self.cfg.classes[lab - 1]] += 1
        return counts


def collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> Tuple[List[torch.Tensor], List[Dict]]:
    """Lists of images and targets (detectors take variable-size lists, not a stacked batch)."""
    return [b[0] for b in batch], [b[1] for b in batch]


__all__ = ["BoxConfig", "CamVidDetection", "DETECTION_CLASSES", "boxes_from_label", "collate"]
