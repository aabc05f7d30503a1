"""Choosing lambda0 from the ROC of the over-activation score d (clean = negative, patched = positive).

ROC and AUC come from scikit-learn; the operating point is ours: by default the smallest threshold
whose false-positive rate on the clean calibration frames is at most ``max_fpr`` (a frame is flagged
when d > lambda0, strictly). The Youden point (max TPR - FPR) is reported alongside.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass
class OperatingPoint:
    threshold: float
    tpr: float
    fpr: float


@dataclass
class RocReport:
    auc: float
    chosen: OperatingPoint
    youden: OperatingPoint
    max_fpr: float
    fpr: List[float]
    tpr: List[float]
    thresholds: List[float]
    n_clean: int
    n_patched: int

    def to_dict(self) -> Dict:
        return asdict(self)


def rates_at(threshold: float, clean: np.ndarray, patched: np.ndarray) -> OperatingPoint:
    """TPR / FPR when flagging d > threshold."""
    return OperatingPoint(float(threshold), float((patched > threshold).mean()), float((clean > threshold).mean()))


def threshold_for_fpr(clean: np.ndarray, max_fpr: float) -> float:
    """Smallest threshold t (among the clean scores) with mean(clean > t) <= max_fpr."""
    s = np.sort(np.asarray(clean, dtype=np.float64))[::-1]
    k = int(np.floor(max_fpr * len(s)))      # at most k clean frames may exceed the threshold
    return float(s[min(k, len(s) - 1)])


def roc_report(clean: np.ndarray, patched: np.ndarray, max_fpr: float = 0.01) -> RocReport:
    clean, patched = np.asarray(clean, np.float64), np.asarray(patched, np.float64)
    if len(clean) == 0 or len(patched) == 0:
        raise ValueError("ROC needs both clean and patched scores")
    if not (np.isfinite(clean).all() and np.isfinite(patched).all()):
        raise ValueError("non-finite scores")
    y = np.r_[np.zeros(len(clean)), np.ones(len(patched))]
    s = np.r_[clean, patched]
    fpr, tpr, thr = roc_curve(y, s)
    j = int(np.argmax(tpr - fpr))
    # roc_curve flags s >= thr; for our strict rule take the next lower score as the threshold.
    lower = np.sort(s)
    below = lower[lower < thr[j]]
    youden_t = float(below[-1]) if len(below) else float(thr[j]) - 1e-12
    return RocReport(auc=float(roc_auc_score(y, s)), chosen=rates_at(threshold_for_fpr(clean, max_fpr), clean, patched),
                     youden=rates_at(youden_t, clean, patched), max_fpr=max_fpr,
                     fpr=fpr.tolist(), tpr=tpr.tolist(), thresholds=[float(t) if np.isfinite(t) else 1e30 for t in thr],
                     n_clean=len(clean), n_patched=len(patched))
