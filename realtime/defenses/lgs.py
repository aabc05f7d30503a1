"""Local Gradients Smoothing and its saliency-guided variants (``lgs``, ``slgs``, ``wlgs``).

LGS (Naseer et al., WACV 2019), at input resolution, batched: grayscale -> first-order gradient
magnitude -> per-image min-max normalisation -> windows of 15x15 with stride 10 (overlap 5); a window
is kept when its mean normalised gradient exceeds the threshold (0.1), and a pixel keeps its gradient
value when any kept window covers it (else 0) -> ``g = clip(lambda * g, 0, 1)`` with lambda = 2.3 ->
the model runs on ``x * (1 - g)``. The keep-mask is the soft ``1 - g``; the fill colour is black, as in
the paper (``x * (1 - g)``), not the model's mean colour.

SLGS / WLGS (Cheng and Wang, ICPRAM 2022) weight the LGS map by the model's saliency
``S = max_colour |d score / dx|``. For a segmentation network the score is the summed log-probability
of the predicted (argmax) class over all pixels, ``sum_p log softmax(z_p)[argmax z_p]`` — one backward
pass per batch. Their gradient threshold is 0.2 (instead of 0.1).
- SLGS: ``D = opening(S > mean(S))`` (3x3 erosion then 3x3 dilation), ``x * (1 - clip(lambda * D * g))``.
- WLGS: ``S_n = S / max(S)`` per image, ``x * (1 - clip(lambda * S_n * g))``.
lambda: the paper searched 1.5-3.5; we default to the middle of that range, 2.5 (not tuned here).
They need gradients, so they work under a caller's ``torch.no_grad()`` and ``torch.inference_mode()``
(the saliency pass leaves inference mode on a clone of the input).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Defense, DefenseResult, StageTimer
from .registry import DefenseContext, register_defense

_GRAY = (0.299, 0.587, 0.114)


@dataclass
class LGSConfig:
    """LGS settings: window size and stride (pixels), window threshold on the mean normalised gradient,
    smoothing factor lambda."""
    window: int = 15
    stride: int = 10
    threshold: float = 0.1
    smoothing: float = 2.3

    def __post_init__(self) -> None:
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"window and stride must be >= 1, got {self.window}, {self.stride}")
        if not 0.0 <= self.threshold < 1.0 or self.smoothing <= 0:
            raise ValueError(f"threshold must be in [0, 1) and smoothing > 0, got {self.threshold}, "
                             f"{self.smoothing}")


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalised first-order gradient magnitude of the grayscale image, (N,1,H,W)."""
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    gray = (x * w).sum(1, keepdim=True)
    dx = F.pad(gray[..., :, 1:] - gray[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(gray[..., 1:, :] - gray[..., :-1, :], (0, 0, 0, 1))
    mag = torch.sqrt(dx * dx + dy * dy)
    lo = mag.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = mag.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (mag - lo) / (hi - lo).clamp(min=1e-12)


def windowed_gradient(x: torch.Tensor, cfg: LGSConfig) -> torch.Tensor:
    """The LGS map before smoothing: the normalised gradient where a kept window covers the pixel, else 0.

    Windows start every ``stride`` pixels and the last row/column of windows is cut at the border (their
    mean is over the pixels inside the image), so every pixel is covered by at least one window.
    """
    grad = gradient_magnitude(x)
    H, W = grad.shape[-2:]
    k, s = cfg.window, cfg.stride
    ph = max(0, -(-(H - k) // s)) * s + k - H if H > k else k - H
    pw = max(0, -(-(W - k) // s)) * s + k - W if W > k else k - W
    ones = F.pad(torch.ones_like(grad[:1]), (0, pw, 0, ph))
    count = F.avg_pool2d(ones, k, s)                                  # fraction of in-image pixels
    mean = F.avg_pool2d(F.pad(grad, (0, pw, 0, ph)), k, s) / count.clamp(min=1e-12)
    kept = (mean > cfg.threshold).to(grad.dtype)
    cover = F.conv_transpose2d(kept, torch.ones(1, 1, k, k, dtype=grad.dtype, device=grad.device), stride=s)
    return grad * (cover[..., :H, :W] > 0).to(grad.dtype)


def lgs_map(x: torch.Tensor, cfg: LGSConfig) -> torch.Tensor:
    """``g = clip(lambda * windowed_gradient, 0, 1)``: the fraction of each pixel LGS removes."""
    return (cfg.smoothing * windowed_gradient(x, cfg)).clamp(0, 1)


def saliency(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S (N,1,H,W), logits): ``max_colour |d/dx sum_pixels log p(argmax class)|``, safe under no_grad and
    inference mode (runs on a detached clone of ``x`` with gradients enabled)."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
            raise TypeError("saliency needs a model returning dense logits (N,C,H,W)")
        logp = torch.log_softmax(logits.float(), dim=1)
        score = logp.gather(1, logp.detach().argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(score, xg)
    return grad.abs().amax(1, keepdim=True).detach(), logits.detach()


def opening(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary erosion then dilation with a size x size square (drops speckles, keeps blobs)."""
    r = size // 2
    eroded = -F.max_pool2d(-mask, size, stride=1, padding=r)
    return F.max_pool2d(eroded, size, stride=1, padding=r)


class LGS(Defense):
    """Local Gradients Smoothing: ``x * (1 - g)``, then the model."""
    name = "lgs"
    masks = True

    def __init__(self, model: nn.Module, cfg: Optional[LGSConfig] = None,
                 forward: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        super().__init__(model)
        self.cfg = cfg or LGSConfig()
        self.forward = forward or model

    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        with timer("preprocess"):
            g = lgs_map(x, self.cfg)
            keep = 1.0 - g
            xd = x * keep
        with timer("second_pass"):
            out = self.forward(xd)
        return DefenseResult(output=out, defended_input=xd, mask=keep, extras={"lgs_map": g})

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), **asdict(self.cfg)}


class SaliencyLGS(Defense):
    """SLGS (``mode='binary'``) or WLGS (``mode='weighted'``): the LGS map weighted by model saliency."""
    name = "saliency_lgs"
    masks = True
    needs_grad = True

    def __init__(self, model: nn.Module, mode: str, cfg: Optional[LGSConfig] = None,
                 forward: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        super().__init__(model)
        if mode not in ("binary", "weighted"):
            raise ValueError(f"mode must be 'binary' (SLGS) or 'weighted' (WLGS), got {mode!r}")
        self.mode = mode
        self.cfg = cfg or LGSConfig(threshold=0.2, smoothing=2.5)
        self.forward = forward or model

    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        with timer("saliency"):
            sal, first = saliency(self.model, x)
            sal = sal.to(x.dtype)
        with timer("preprocess"):
            g = windowed_gradient(x, self.cfg)
            if self.mode == "binary":
                weight = opening((sal > sal.flatten(1).mean(1).view(-1, 1, 1, 1)).to(x.dtype))
            else:
                weight = sal / sal.flatten(1).amax(1).view(-1, 1, 1, 1).clamp(min=1e-12)
            keep = 1.0 - (self.cfg.smoothing * weight * g).clamp(0, 1)
            xd = x * keep
        with timer("second_pass"):
            out = self.forward(xd)
        return DefenseResult(output=out, defended_input=xd, mask=keep, first_output=first,
                             extras={"saliency": sal, "weight": weight, "lgs_gradient": g})

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "mode": self.mode, **asdict(self.cfg)}


class SLGS(SaliencyLGS):
    """SLGS: binarised, opened saliency times the LGS gradient map."""
    name = "slgs"

    def __init__(self, model: nn.Module, cfg: Optional[LGSConfig] = None,
                 forward: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        super().__init__(model, "binary", cfg, forward)


class WLGS(SaliencyLGS):
    """WLGS: max-normalised saliency as a weight on the LGS gradient map."""
    name = "wlgs"

    def __init__(self, model: nn.Module, cfg: Optional[LGSConfig] = None,
                 forward: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        super().__init__(model, "weighted", cfg, forward)


@register_defense("lgs")
def _build_lgs(ctx: DefenseContext, **options: Any) -> Defense:
    """LGS with the original settings (``options`` override ``LGSConfig``)."""
    return LGS(ctx.model, LGSConfig(**options), ctx.forward())


@register_defense("slgs")
def _build_slgs(ctx: DefenseContext, **options: Any) -> Defense:
    """SLGS: gradient threshold 0.2, lambda 2.5 unless overridden."""
    return SLGS(ctx.model, LGSConfig(**{"threshold": 0.2, "smoothing": 2.5, **options}),
                       ctx.forward())


@register_defense("wlgs")
def _build_wlgs(ctx: DefenseContext, **options: Any) -> Defense:
    """WLGS: gradient threshold 0.2, lambda 2.5 unless overridden."""
    return WLGS(ctx.model, LGSConfig(**{"threshold": 0.2, "smoothing": 2.5, **options}),
                       ctx.forward())


__all__ = ["LGS", "LGSConfig", "SLGS", "SaliencyLGS", "WLGS", "gradient_magnitude", "lgs_map", "opening", "saliency",
           "windowed_gradient"]
