"""Segmentation losses: plain / class-weighted cross-entropy and online hard-example mining (OHEM)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def class_weights(label_counts: torch.Tensor, mode: str = "sqrt_medfreq") -> Optional[torch.Tensor]:
    """Per-class weights from pixel counts: ``medfreq`` = median/freq (Eigen & Fergus), ``sqrt_medfreq``
    its square root (gentler: rare classes up-weighted without drowning road/sky), ``none``."""
    if mode == "none":
        return None
    freq = label_counts.double() / label_counts.sum()
    w = freq.median() / freq.clamp_min(1e-12)
    if mode == "sqrt_medfreq":
        w = w.sqrt()
    elif mode != "medfreq":
        raise ValueError(f"unknown class weighting '{mode}'")
    return w.float()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      weight: Optional[torch.Tensor] = None, ohem_thresh: Optional[float] = 0.7,
                      min_kept_frac: float = 1 / 16) -> torch.Tensor:
    """Cross-entropy over non-ignored pixels; with ``ohem_thresh`` only pixels whose true-class
    probability is below it (at least ``min_kept_frac`` of the valid pixels, the hardest) count."""
    logits = logits.float()
    plain = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = target.flatten() != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    if weight is not None:
        w = weight.to(logits.device)[target.flatten().clamp(max=weight.numel() - 1)] * valid
    else:
        w = valid.float()
    if ohem_thresh is None:
        return (plain * w).sum() / w.sum()
    loss_v = plain[valid]
    n_min = max(int(loss_v.numel() * min_kept_frac), 1)
    cut = -math.log(ohem_thresh)
    keep = plain > cut
    if int((keep & valid).sum()) < n_min:
        kth = loss_v.topk(n_min).values[-1]
        keep = plain >= kth
    keep = keep & valid
    return (plain * w * keep).sum() / (w * keep).sum().clamp_min(1e-6)
