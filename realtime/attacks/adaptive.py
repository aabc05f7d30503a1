"""Extra attack objectives that look inside the network: beta-controlled over-activation (L_OZ) and the
defense-aware Adv-Mask / Adv-Flag attacks against a calibrated Z-Mask (zmask.md section 5).

They plug into ``craft_universal_patch`` as ``extra_loss`` with weight ``1 - beta`` (``beta`` plays the
paper's alpha for the defense-aware ones), and need the model wrapped in :class:`TappedForward` so
the hooked maps of the same forward pass are at hand.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from realtime.defenses import ActivationTaps, ZMask
from realtime.defenses.spr import SPRConfig, to_work, zscore


class TappedForward(nn.Module):
    """``forward(x)`` returns the model output and keeps this pass's tapped maps in ``last``."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.taps = ActivationTaps(model, layers)
        self.last: Dict[str, torch.Tensor] = {}
        self.eval()       # a new Module is in training mode: crafting would restore BN/dropout training after

    def forward(self, x: torch.Tensor):
        out, self.last = self.taps(x)
        return out


class OverActivationLoss:
    """L_OZ: mean over shallow layers and channels of |sum of z over the patch| / |patch|.

    z is the channel-wise z-score on the SPR working grid (the space Z-Mask sees); the patch is its
    coverage on that grid. Minimising it (low beta) yields patches with weak over-activation.
    """

    def __init__(self, tapped: TappedForward, layers: Sequence[str], mu: Dict[str, torch.Tensor],
                 sigma: Dict[str, torch.Tensor], spr: SPRConfig) -> None:
        self.tapped, self.layers, self.mu, self.sigma, self.spr = tapped, list(layers), mu, sigma, spr

    def __call__(self, patched: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return over_activation(self.tapped.last, mask, self.layers, self.mu, self.sigma, self.spr).mean()


def over_activation(taps: Dict[str, torch.Tensor], mask: torch.Tensor, layers: Sequence[str],
                    mu: Dict[str, torch.Tensor], sigma: Dict[str, torch.Tensor], spr: SPRConfig) -> torch.Tensor:
    """Per-frame L_OZ (N,): mean over ``layers`` and channels of |mean z under the patch|."""
    cover = F.adaptive_avg_pool2d(mask.float(), spr.work_size)                   # (N,1,HR,WR)
    area = cover.sum(dim=(2, 3)).clamp_min(1e-6)                                 # (N,1)
    terms = []
    for name in layers:
        f = taps[name].float()
        z = zscore(to_work(f, spr), mu[name].to(f.device), sigma[name].to(f.device))
        terms.append(((z * cover).sum(dim=(2, 3)) / area).abs().mean(dim=1))
    return torch.stack(terms).mean(dim=0)


class DefenseAwareLoss:
    """Adv-Mask: -BCE(M~, true mask), pushing the soft mask off the patch; Adv-Flag: -BCE(sigmoid(d -
    lambda0), 1), pushing the score d below lambda0 so the alarm stays off. Differentiable through the
    heatmaps and the fusion block of ``zmask`` (whose model must be ``tapped.model``)."""

    def __init__(self, tapped: TappedForward, zmask: ZMask, kind: str) -> None:
        if kind not in ("mask", "flag"):
            raise ValueError(f"defense-aware attack must be 'mask' or 'flag', got {kind!r}")
        self.tapped, self.zmask, self.kind = tapped, zmask, kind

    def __call__(self, patched: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        h_s, h_d = self.zmask.heatmaps({k: v.float() for k, v in self.tapped.last.items()})
        soft, d = self.zmask.fusion(h_s, h_d)
        if self.kind == "mask":
            target = (F.adaptive_avg_pool2d(mask.float(), soft.shape[-2:]) > 0.5).float()
            return -F.binary_cross_entropy(soft.clamp(1e-6, 1 - 1e-6), target)
        p = torch.sigmoid(d - self.zmask.cfg.lambda0).clamp(1e-6, 1 - 1e-6)
        return -F.binary_cross_entropy(p, torch.ones_like(p))
