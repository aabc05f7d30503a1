"""The strongest white-box attacker against a calibrated Z-Mask that this project writes (issue 22).

It knows every step of the defense and attacks the output the user actually gets:

* the model is wrapped in :class:`DefendedForward`, whose forward runs Z-Mask's own ``detect`` on the
  first pass and, on the frames Z-Mask flags, the second pass on the shielded input. Flags and the
  binary keep-mask are not differentiable: they are taken as they are (BPDA, identity on the pixels
  the mask keeps), so ``L_adv`` on this output pushes the patch to hurt *after* masking;
* :class:`EvasionLoss` adds what makes the frame look clean to the detector: the mean |z| of every
  hooked layer under the patch (on the SPR working grid: what Z-Mask sees; the outlier cue's layers
  too when the defense has one), a hinge on the score (d, or max(d, cue * lambda0) with the cue) above
  ``margin * lambda0``, and the soft mask M~ under the patch.

``craft_universal_patch(DefendedForward(zm), ..., extra_loss=EvasionLoss(...))`` then optimises
``beta * L_adv(defended output) + (1 - beta) * evasion``; sweeping beta traces the attacker's
damage-vs-detection trade-off (``benchmarks.adaptive``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from realtime.defenses import ZMask
from realtime.defenses.spr import to_work, zscore

from realtime.core.taps import first_tensor


@dataclass(frozen=True)
class WhiteBoxConfig:
    """Which parts of the defense the attacker fights, and how hard (weights inside the evasion term)."""
    z_weight: float = 1.0          # mean |z| under the patch, every hooked layer
    score_weight: float = 1.0      # relu(d - margin * lambda0) / lambda0
    mask_weight: float = 1.0       # mean M~ under the patch
    margin: float = 0.5            # aim d at half the threshold: a safety gap for unseen frames
    second_pass: bool = True       # L_adv on the defended output (False: on the first pass only)

    def __post_init__(self) -> None:
        if min(self.z_weight, self.score_weight, self.mask_weight) < 0:
            raise ValueError("white-box weights must be >= 0")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")


class DefendedForward(nn.Module):
    """``forward(x)`` -> logits the Z-Mask pipeline outputs for ``x``; the pass's internals in ``last``.

    Differentiable from ``x`` through the first pass, the heatmaps, the fusion block and (on flagged
    frames) the second pass over the pixels the keep-mask leaves; the flag and the mask are constants."""

    def __init__(self, zmask: ZMask, second_pass: bool = True) -> None:
        super().__init__()
        self.zmask = zmask
        self.second_pass = second_pass
        self.last: Dict[str, torch.Tensor] = {}
        self.eval()       # a new Module is in training mode: crafting would restore BN/dropout training after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zm = self.zmask
        out, taps = zm.taps(x)
        det = zm.detect(taps, (x.shape[-2], x.shape[-1]))
        logits = first_tensor(out)
        self.last = {"taps": taps, "soft": det.soft_mask, "score": det.score, "flagged": det.flagged}
        if not self.second_pass or not bool(det.flagged.any()):
            return logits
        index = torch.nonzero(det.flagged, as_tuple=False).flatten()
        shielded = zm.shield(x.index_select(0, index), det.mask.index_select(0, index).detach())
        second = first_tensor(zm.taps.plain(shielded))
        return logits.index_copy(0, index, second.to(logits.dtype))


def zscore_under_patch(taps: Dict[str, torch.Tensor], mask: torch.Tensor, zmask: ZMask) -> torch.Tensor:
    """(N,) mean over the defense's layers of the mean |z| over channels and the patch's working-grid cells.

    The layers are Z-Mask's and, for a Z-Mask with an outlier cue (``realtime.defenses.cue``), the cue's
    too, each with its own clean statistics: the attacker hides from every layer the defense reads."""
    spr = zmask.cfg.spr
    cover = F.adaptive_avg_pool2d(mask.float(), spr.work_size)                   # (N,1,HR,WR)
    area = cover.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    stats = [(name, zmask.stats.mu[name], zmask.stats.sigma[name]) for name in zmask.cfg.layers]
    cue = getattr(zmask, "cue", None)
    if cue is not None:
        stats += [(name, cue.mu[name], cue.sigma[name]) for name in cue.layers]
    terms = []
    for name, mu, sigma in stats:
        f = taps[name].float()
        z = zscore(to_work(f, spr), mu.to(f.device), sigma.to(f.device))
        terms.append((z.abs().mean(dim=1, keepdim=True) * cover).sum(dim=(1, 2, 3)) / area)
    return torch.stack(terms).mean(dim=0)


class EvasionLoss:
    """The extra loss (minimised) of the white-box attacker: looks clean to every cue Z-Mask reads."""

    def __init__(self, forward: DefendedForward, cfg: WhiteBoxConfig) -> None:
        self.forward, self.cfg = forward, cfg

    def parts(self, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The three evasion terms of the last pass, each averaged over the batch."""
        last, zm = self.forward.last, self.forward.zmask
        lam = max(abs(float(zm.cfg.lambda0)), 1e-6)
        soft = last["soft"]
        cover = F.adaptive_avg_pool2d(mask.float(), soft.shape[-2:])
        return {"z": zscore_under_patch(last["taps"], mask, zm).mean(),
                "score": F.relu(last["score"].float() - self.cfg.margin * zm.cfg.lambda0).mean() / lam,
                "mask": ((soft.float() * cover).sum(dim=(1, 2, 3))
                         / cover.sum(dim=(1, 2, 3)).clamp_min(1e-6)).mean()}

    def __call__(self, patched: torch.Tensor, mask: torch.Tensor, logits: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        p = self.parts(mask)
        c = self.cfg
        return c.z_weight * p["z"] + c.score_weight * p["score"] + c.mask_weight * p["mask"]

