"""Boxes derived from CamVid label maps (connected components of the 'thing' classes)."""
import numpy as np
import pytest
import torch

from realtime.data import CLASSES, IGNORE_INDEX
from realtime.data.detection import BoxConfig, CamVidDetection, boxes_from_label, collate

CAR, PED, SIGN, ROAD = (CLASSES.index(c) for c in ("car", "pedestrian", "sign/symbol", "road"))


def _label() -> np.ndarray:
    lab = np.full((60, 80), ROAD, dtype=np.int64)
    lab[10:20, 5:25] = CAR            # car 1: 10 x 20 = 200 px
    lab[10:20, 40:60] = CAR           # car 2, separate
    lab[30:50, 30:36] = PED           # pedestrian 20 x 6 = 120 px
    lab[55:58, 70:73] = SIGN          # sign 9 px: below min_area
    lab[0:5, 0:80] = IGNORE_INDEX     # void makes no box
    return lab


def test_components_become_boxes_with_torchvision_labels():
    boxes, labels = boxes_from_label(_label())
    got = sorted(zip(labels.tolist(), boxes.tolist()))
    assert got == [(1, [5.0, 10.0, 25.0, 20.0]), (1, [40.0, 10.0, 60.0, 20.0]), (2, [30.0, 30.0, 36.0, 50.0])]
    assert boxes.dtype == np.float32 and labels.dtype == np.int64


def test_min_area_connectivity_and_merging():
    lab = _label()
    _, labels = boxes_from_label(lab, BoxConfig(min_area=9))
    assert (labels == 4).sum() == 1                               # the small sign counts at min_area 9
    lab[10:20, 25:40] = CAR                                       # bridge the two cars: one component
    boxes, labels = boxes_from_label(lab)
    assert [b for b, l in zip(boxes.tolist(), labels.tolist()) if l == 1] == [[5.0, 10.0, 60.0, 20.0]]
    diag = np.full((4, 4), ROAD, dtype=np.int64)
    diag[0, 0] = diag[1, 1] = CAR
    assert len(boxes_from_label(diag, BoxConfig(min_area=1))[0]) == 1                   # 8-connected
    assert len(boxes_from_label(diag, BoxConfig(min_area=1, connectivity=4))[0]) == 2


def test_bad_input():
    with pytest.raises(ValueError, match="HxW"):
        boxes_from_label(np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="unknown CamVid classes"):
        BoxConfig(classes=("truck",))
    with pytest.raises(ValueError, match="connectivity"):
        BoxConfig(connectivity=6)
    empty = boxes_from_label(np.full((5, 5), ROAD, dtype=np.int64))
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_real_val_frames(camvid_root):
    ds = CamVidDetection(str(camvid_root), "val")
    x, t = ds[0]
    assert x.shape == (3, 360, 480) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(t) == {"boxes", "labels", "area", "iscrowd", "image_id"}
    b = t["boxes"]
    assert len(b) > 0 and bool(((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all())
    assert bool((b[:, 2] <= 480).all() and (b[:, 3] <= 360).all())
    counts = ds.class_counts(range(0, len(ds), 10))
    assert counts["car"] > 0 and counts["pedestrian"] > 0
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and isinstance(targets[1]["labels"], torch.Tensor)
