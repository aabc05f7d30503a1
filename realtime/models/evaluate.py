"""Segmentation accuracy of a model on labelled frames: the one mIoU loop that training and benchmarks share."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from tqdm import tqdm

from realtime.core.devices import autocast
from realtime.core.metrics import ConfusionMatrix
from realtime.data import CLASSES, IGNORE_INDEX
from realtime.data.augment import resize_batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 8,
             size: Optional[Tuple[int, int]] = None, amp: bool = False, progress: bool = False) -> Dict:
    """mIoU of ``model`` on uint8 ``images`` (N,3,H,W) / ``labels`` (N,H,W) at ``size`` (default: native).

    Predictions are made at ``size`` and scored against labels resized (nearest) to that size.
    """
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    size = size or tuple(images.shape[-2:])
    cm = ConfusionMatrix(len(CLASSES), IGNORE_INDEX, dev)
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        x, y = resize_batch(images[s:s + batch_size].to(dev), labels[s:s + batch_size].to(dev), size)
        with autocast(dev, amp):
            logits = model(x)
        cm.update(logits.argmax(1), y)
    model.train(was_training)
    out = cm.summary(CLASSES)
    out["frames"] = len(images)
    out["size"] = list(size)
    return out


__all__ = ["evaluate"]
