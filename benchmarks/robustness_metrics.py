"""Metric functions of the robustness benchmark: mask quality against the true patch, detection ROC.

Kept free of models and I/O so the tests can check them on hand-made cases. Segmentation accuracy
(mIoU outside the patch) uses ``realtime.core.metrics.ConfusionMatrix``; ``tests/test_robustness.py``
cross-checks it against scikit-learn's ``confusion_matrix`` / ``jaccard_score``. Why keep it: it is
one ``bincount`` on the tensor's own device, so on a GPU the labels never leave it (sklearn needs a
host copy of every batch). On the CPU it is no faster: `python -m benchmarks.robustness_metrics`
measured 200-340 ms for ConfusionMatrix vs ~215 ms for sklearn on 8x360x480 random labels (2 shared
cores, 2026-11-23). ROC, AUC and the TPR at a fixed FPR come from scikit-learn.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from realtime.core.metrics import ConfusionMatrix


@dataclass
class MaskCounts:
    """Pixel counts of a predicted masked region (keep < 0.5) against the true patch (gt > 0.5).

    ``tp``: masked patch pixels, ``fp``: masked pixels outside the patch, ``fn``: patch pixels left,
    ``pixels``: all pixels seen, ``frames``: frames summed.
    """
    tp: int = 0
    fp: int = 0
    fn: int = 0
    pixels: int = 0
    frames: int = 0

    def __add__(self, other: "MaskCounts") -> "MaskCounts":
        return MaskCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                          self.pixels + other.pixels, self.frames + other.frames)

    def summary(self) -> Dict[str, Optional[float]]:
        """Precision, recall, IoU of the masked region (None where undefined) and the masked fraction."""
        masked = self.tp + self.fp
        patch = self.tp + self.fn
        union = self.tp + self.fp + self.fn
        return {"precision": self.tp / masked if masked else None,
                "recall": self.tp / patch if patch else None,
                "iou": self.tp / union if union else None,
                "masked_fraction": masked / self.pixels if self.pixels else None,
                "frames": self.frames, **{k: v for k, v in asdict(self).items() if k != "frames"}}


def per_frame_mask_counts(keep: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """(N,3) int64 array of per-frame (tp, fp, fn) for keep-masks ``keep`` and true patch masks ``gt``.

    Both (N,1,H,W) (or (N,H,W)) at the same resolution; keep: 1 = kept, 0 = masked; gt: 1 = patch.
    """
    if keep.shape[0] != gt.shape[0] or keep.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"keep-mask {tuple(keep.shape)} and patch mask {tuple(gt.shape)} do not match")
    masked = (keep < 0.5).flatten(1)
    patch = (gt.to(keep.device) > 0.5).flatten(1)
    tp = (masked & patch).sum(1)
    fp = (masked & ~patch).sum(1)
    fn = (~masked & patch).sum(1)
    return torch.stack([tp, fp, fn], 1).cpu().numpy().astype(np.int64)


def sum_counts(rows: np.ndarray, pixels_per_frame: int, select: Optional[np.ndarray] = None) -> MaskCounts:
    """Sum per-frame (tp, fp, fn) rows, optionally only the frames where ``select`` is True."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    if select is not None:
        rows = rows[np.asarray(select, dtype=bool)]
    tp, fp, fn = (int(v) for v in rows.sum(0)) if len(rows) else (0, 0, 0)
    return MaskCounts(tp, fp, fn, pixels_per_frame * len(rows), len(rows))


def tpr_at_fpr(negatives: Sequence[float], positives: Sequence[float], max_fpr: float = 0.01) -> float:
    """Highest TPR of any threshold whose FPR is at most ``max_fpr`` (scikit-learn ``roc_curve`` points).

    A frame counts as flagged when its score >= the threshold; with n clean frames the attainable FPRs
    are multiples of 1/n, so with 100 clean frames "1 %" allows exactly one false positive.
    """
    y, s = _labels_scores(negatives, positives)
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


def detection_metrics(negatives: Sequence[float], positives: Sequence[float], max_fpr: float = 0.01,
                      curve_points: int = 200) -> Dict:
    """AUC, TPR at ``max_fpr`` and the ROC curve (thinned to about ``curve_points`` points)."""
    y, s = _labels_scores(negatives, positives)
    fpr, tpr, _ = roc_curve(y, s)
    step = max(1, len(fpr) // curve_points)
    keep = sorted(set(range(0, len(fpr), step)) | {len(fpr) - 1})
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_fpr": tpr_at_fpr(negatives, positives, max_fpr),
            "max_fpr": max_fpr, "roc_fpr": [float(fpr[i]) for i in keep], "roc_tpr": [float(tpr[i]) for i in keep],
            "negatives": int((y == 0).sum()), "positives": int((y == 1).sum())}


def _labels_scores(negatives: Sequence[float], positives: Sequence[float]) -> tuple:
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError(f"ROC needs clean and patched scores (got {len(neg)} clean, {len(pos)} patched)")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("detection scores contain NaN or inf")
    return np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]


def miou_from_confusion(rows: List[List[int]], class_names: Sequence[str], ignore_index: int) -> Dict:
    """``ConfusionMatrix.summary`` of a saved (list of lists) matrix: mIoU over present classes etc."""
    mat = torch.tensor(rows, dtype=torch.int64)
    cm = ConfusionMatrix(mat.shape[0], ignore_index)
    cm.mat = mat
    return cm.summary(class_names)


def _speed_check() -> None:
    """Time ConfusionMatrix.update against sklearn's confusion_matrix on CamVid-sized random labels."""
    import time

    from sklearn.metrics import confusion_matrix

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 12, (8, 360, 480), generator=g)
    p = torch.randint(0, 11, (8, 360, 480), generator=g)
    cm = ConfusionMatrix(11, 11)
    t0 = time.perf_counter()
    for _ in range(5):
        cm.update(p, y)
    t1 = time.perf_counter()
    keep = (y < 11).numpy().ravel()
    for _ in range(5):
        confusion_matrix(y.numpy().ravel()[keep], p.numpy().ravel()[keep], labels=list(range(11)))
    t2 = time.perf_counter()
    print(f"ConfusionMatrix.update: {(t1 - t0) / 5 * 1e3:.1f} ms; sklearn confusion_matrix: "
          f"{(t2 - t1) / 5 * 1e3:.1f} ms (8x360x480 labels, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    _speed_check()
