"""Turn raw cells into the reported numbers (one dict per defense x condition).

Detection uses the defense's own clean-frame scores (condition ``none``, same frames) as the
negatives of every condition's ROC; masking precision / recall / IoU are pixel counts summed over
all frames, and again over the flagged frames only ("gated") for defenses that flag.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from realtime.data import CLASSES, IGNORE_INDEX

from .robustness_metrics import detection_metrics, miou_from_confusion, sum_counts
from .robustness_runner import Cell


def _latency(ms: list) -> Dict[str, Optional[float]]:
    a = np.asarray(ms, dtype=np.float64)
    if not len(a):
        return {"median": None, "p90": None, "mean": None}
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean())}


def summarize_cell(cell: Cell, clean: Optional[Cell], max_fpr: float = 0.01) -> Dict:
    """Reported numbers of one cell; ``clean`` is the same defense's ``none`` cell (ROC negatives)."""
    seg = miou_from_confusion(cell.confusion, CLASSES, IGNORE_INDEX)
    out: Dict = {"frames": len(cell.latency_ms), "miou": seg["miou"], "pixel_accuracy": seg["pixel_accuracy"],
                 "pixels_scored": seg["pixels"], "per_class_iou": seg["per_class_iou"],
                 "latency_ms": _latency(cell.latency_ms)}
    if cell.confusion_outside_l is not None:
        out["miou_outside_l_place"] = miou_from_confusion(cell.confusion_outside_l, CLASSES, IGNORE_INDEX)["miou"]
    flagged = np.asarray(cell.flagged, dtype=bool) if cell.flagged is not None else None
    if flagged is not None:
        out["flag_rate"] = float(flagged.mean()) if len(flagged) else None
    if cell.scores is not None:
        s = np.asarray(cell.scores, dtype=np.float64)
        out["mean_score"] = float(s.mean()) if len(s) else None
        out["scores"] = [float(v) for v in s]
        if cell.condition != "none" and clean is not None and clean.scores is not None:
            out["detection"] = detection_metrics(clean.scores, s, max_fpr)
    if cell.mask_counts is not None:
        rows = np.asarray(cell.mask_counts, dtype=np.int64).reshape(-1, 3)
        out["mask"] = sum_counts(rows, cell.pixels_per_frame).summary()
        if flagged is not None:
            out["mask_gated"] = sum_counts(rows, cell.pixels_per_frame, flagged).summary()
    return out


def summarize_defense(cells: Dict[str, Cell], max_fpr: float = 0.01) -> Dict:
    """``{"conditions": {name: numbers}, "latency_ms": over every timed frame, "frames_timed": n}``."""
    clean = cells.get("none")
    lat = [v for c in cells.values() for v in c.latency_ms]
    return {"conditions": {name: summarize_cell(c, clean, max_fpr) for name, c in cells.items()},
            "latency_ms": _latency(lat), "frames_timed": len(lat)}


__all__ = ["summarize_cell", "summarize_defense"]
