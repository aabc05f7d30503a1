"""Z-Mask's Fusion and Detection block: 8 trainable scalars turning (H_S, H_D) into a soft mask and a score.

    g  = sigmoid(w1 * tanh(w2 * H_D + b2) + b1)           region of interest from the deep map
    M~ = sigmoid(w4 * tanh(w3 * (H_S * g) + b3) + b4)     soft mask in [0,1]
    d  = sum(H_S * H_D * M~) / (1 + sum(M~))              over-activation score per frame
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

PARAM_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")

# Untrained starting point, chosen so the block is usable before training:
#  * gate: w1=1, w2=1, b2=0, b1=3 -> g = sigmoid(3 + tanh(H_D)) in [0.95, 0.98] for H_D >= 0, i.e. ~1
#    everywhere (what the authors' shipped block ends up with) while every parameter still gets a
#    gradient;
#  * mask: w3=1, b3=-1, w4=4, b4=0 -> M~ > 0.5 exactly where H_S * g > 1, i.e. where the refined
#    heatmap reaches about one standard deviation of clean activity; w4=4 makes that step sharp.
# (w's = 1, b's = 0 would give M~ = sigmoid(tanh(.)) >= 0.5 everywhere: every flagged pixel masked.)
DEFAULT_INIT: Dict[str, float] = {"w1": 1.0, "b1": 3.0, "w2": 1.0, "b2": 0.0,
                                  "w3": 1.0, "b3": -1.0, "w4": 4.0, "b4": 0.0}


class FusionBlock(nn.Module):
    """The 8-scalar fusion/detection block; ``forward(h_s, h_d)`` -> ``(soft_mask (N,1,HR,WR), d (N,))``."""

    def __init__(self, **init: float) -> None:
        super().__init__()
        unknown = set(init) - set(PARAM_NAMES)
        if unknown:
            raise ValueError(f"unknown fusion parameters {sorted(unknown)}; expected {PARAM_NAMES}")
        values = {**DEFAULT_INIT, **init}
        for name in PARAM_NAMES:
            self.register_parameter(name, nn.Parameter(torch.tensor(float(values[name]))))

    def gate(self, h_d: torch.Tensor) -> torch.Tensor:
        """Region-of-interest gate g from the deep heatmap."""
        return torch.sigmoid(self.w1 * torch.tanh(self.w2 * h_d + self.b2) + self.b1)

    def forward(self, h_s: torch.Tensor, h_d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if h_s.shape != h_d.shape or h_s.dim() != 4 or h_s.shape[1] != 1:
            raise ValueError(f"H_S and H_D must both be (N,1,HR,WR), got {tuple(h_s.shape)} and "
                             f"{tuple(h_d.shape)}")
        g = self.gate(h_d)
        soft = torch.sigmoid(self.w4 * torch.tanh(self.w3 * (h_s * g) + self.b3) + self.b4)
        score = (h_s * h_d * soft).sum(dim=(1, 2, 3)) / (1.0 + soft.sum(dim=(1, 2, 3)))
        return soft, score

    def to_dict(self) -> Dict[str, float]:
        """Parameters as plain floats (the JSON artifact)."""
        return {name: float(getattr(self, name).detach().cpu()) for name in PARAM_NAMES}

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> "FusionBlock":
        """Rebuild from ``to_dict`` output; every one of the 8 parameters must be present."""
        missing = [n for n in PARAM_NAMES if n not in values]
        if missing:
            raise KeyError(f"fusion parameters missing: {missing}")
        return cls(**{n: float(values[n]) for n in PARAM_NAMES})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:.4g}" for k, v in self.to_dict().items())
