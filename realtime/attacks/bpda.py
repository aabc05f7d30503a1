"""BPDA (Athalye et al., 2018): attack a defense whose pre-processing has no useful gradient.

Forward runs the real, non-differentiable step (thresholding, inpainting, a detector's binary mask);
backward pretends it was ``approx`` (the identity by default: straight-through). Wrap a baseline's
input-cleaning step and hand the result to ``craft_universal_patch`` as the model:

    attacked = DefendedModel(model, bpda(lgs.clean))
    patch, _ = craft_universal_patch(attacked, images, labels, cfg, device)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]


def bpda(step: Transform, approx: Optional[Transform] = None) -> Transform:
    """``step`` in the forward pass, the gradient of ``approx`` (identity if None) in the backward pass.

    Implemented as ``a + (step(x) - a).detach()`` with ``a = approx(x)``, so the value is exactly
    ``step(x)`` and autograd sees only ``approx``. ``step`` must keep the input's shape."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = step(x.detach())
        if y.shape != x.shape:
            raise ValueError(f"BPDA needs a shape-preserving step, got {tuple(x.shape)} -> {tuple(y.shape)}")
        a = x if approx is None else approx(x)
        return a + (y.to(a.dtype) - a).detach()
    return wrapped


class DefendedModel(nn.Module):
    """``model(defense(x))`` as one module, so attack code treats a pre-processing defense like a model."""

    def __init__(self, model: nn.Module, defense: Transform) -> None:
        super().__init__()
        self.model = model
        self.defense = defense

    def forward(self, x: torch.Tensor):
        return self.model(self.defense(x))
