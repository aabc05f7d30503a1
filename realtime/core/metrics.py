"""Segmentation metrics from a confusion matrix accumulated on the device.

The confusion matrix is one ``bincount`` per batch (kept on the GPU, no host sync per frame);
``tests/test_losses_metrics.py`` checks it against scikit-learn's ``confusion_matrix``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu") -> None:
        self.n = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``pred``/``target`` int tensors of equal shape; ``valid`` optionally restricts the pixels counted."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.n)
        if valid is not None:
            keep &= valid
        idx = target[keep].long() * self.n + pred[keep].long()
        self.mat += torch.bincount(idx, minlength=self.n * self.n).view(self.n, self.n).to(self.mat.device)

    def iou(self) -> torch.Tensor:
        """Per-class IoU (rows = truth, cols = prediction); NaN for a class absent from truth and prediction."""
        m = self.mat.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))

    def summary(self, class_names: Sequence[str]) -> Dict:
        iou = self.iou().cpu()
        m = self.mat.double().cpu()
        per_class: Dict[str, float] = {n: float(v) for n, v in zip(class_names, iou.tolist())}
        present: List[float] = [v for v in iou.tolist() if v == v]
        return {"miou": sum(present) / max(len(present), 1), "per_class_iou": per_class,
                "pixel_accuracy": float(m.diag().sum() / m.sum().clamp_min(1)), "pixels": int(m.sum())}
