"""Spatial Pooling Refinement (SPR): plain-torch reference of Z-Mask's per-layer heatmaps.

This module is the oracle for the fused kernels, so every step is written out the way the spec
(docs/zmask.md section 3) states it:

    z   = (R(h) - mu) / (sigma + eps)                       C x HR x WR
    p_i = R(|AvgPool_{k_i}(z)|).mean(over channels)         1 x HR x WR, per kernel in the given order
    H   = p_1;  H = H / (1 + max(H)) * p_i  for i >= 2       max per sample

Two modes:

* ``"same"`` (default): the pooled map stays aligned with its input. A kernel ``k`` along an axis
  averages the window ``[i - k//2, i + k//2]`` clipped to the map (zero padding of ``k//2`` on both
  sides, ``count_include_pad=False``), so the window is ``2*(k//2)+1`` wide: odd kernels are used
  as they are, an even kernel ``k`` becomes the symmetric window ``k+1``. That keeps the alignment
  exact (no half-pixel shift) at the cost of one extra row/column for even kernels. Feature maps are
  resized to the working size with bilinear interpolation (``align_corners=False``, no antialias).
* ``"demo"``: what the authors' public demo computes: unpadded ``AvgPool2d(k, stride=1)`` (the map
  shrinks to ``HR-kh+1 x WR-kw+1``), then a *nearest* resize back to the working size; feature maps
  are resized with nearest too.

The box average is separable (rows, then columns) in both modes, which gives exactly the 2-D
average (the clipped window is a rectangle and its pixel count factorises) at a fraction of the
cost. The channel mean is taken before the resize back in ``"demo"`` mode: nearest resizing only
selects pixels, so this equals ``R(|.|).mean`` exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

Kernel = Tuple[int, int]

MODES = ("same", "demo")
# Resize used for feature maps (and for pooled maps in 'demo' mode) per SPR mode.
_INTERP = {"same": "bilinear", "demo": "nearest", "bilinear": "bilinear", "nearest": "nearest"}

# Paper settings (docs/zmask.md section 3) at their reference input sizes (H, W).
# Segmentation: Cityscapes 1024x2048. Detection: the paper gives R = 400x500 without an input size;
# we take 800x1000 (torchvision detectors resize the short side to 800, COCO frames are ~4:3 / 5:4,
# and R is then exactly half the input, as for the stride-2 stem the hooked layers sit on).
_PAPER = {
    "segmentation": dict(ref=(1024, 2048), work=(150, 300),
                         shallow=((64, 128), (32, 64), (16, 32), (8, 16)),
                         deep=((64, 128), (32, 64))),
    "detection": dict(ref=(800, 1000), work=(400, 500),
                      shallow=((40, 40), (25, 25), (10, 10)),
                      deep=((80, 80), (40, 40))),
}


def _round(v: float) -> int:
    """Round half up (Python's ``round`` would send 22.5 to 22 and 23.5 to 24)."""
    return int(math.floor(v + 0.5))


@dataclass(frozen=True)
class SPRConfig:
    """Working size ``(HR, WR)``, kernel lists ``((kh, kw), ...)`` largest first, and the mode."""
    work_size: Tuple[int, int]
    kernels_shallow: Tuple[Kernel, ...]
    kernels_deep: Tuple[Kernel, ...]
    mode: str = "same"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SPR mode must be one of {MODES}, got {self.mode!r}")
        if len(self.work_size) != 2 or min(self.work_size) < 1:
            raise ValueError(f"work_size must be two positive ints, got {self.work_size}")
        for k in (*self.kernels_shallow, *self.kernels_deep):
            if len(k) != 2 or min(k) < 1:
                raise ValueError(f"kernels must be (kh, kw) with both >= 1, got {k}")
            if self.mode == "demo" and (k[0] > self.work_size[0] or k[1] > self.work_size[1]):
                raise ValueError(f"'demo' mode pools without padding: kernel {k} exceeds the working size "
                                 f"{self.work_size}")
        if not self.kernels_shallow or not self.kernels_deep:
            raise ValueError("both kernel lists need at least one kernel")

    @classmethod
    def for_input(cls, h: int, w: int, task: str = "segmentation", mode: str = "same") -> "SPRConfig":
        """The paper's settings scaled to an ``h x w`` input.

        Each axis scales by ``h/ref_h`` (``w/ref_w``); working size and kernels are rounded half up,
        kept >= 1, and kernels are clipped to the working size. At the reference size this returns
        the paper's numbers exactly; at 360x480 (CamVid) segmentation gives R = 53x70 and
        K_S = (23,30), (11,15), (6,8), (3,4), K_D = (23,30), (11,15).
        """
        if task not in _PAPER:
            raise ValueError(f"task must be one of {sorted(_PAPER)}, got {task!r}")
        if h < 1 or w < 1:
            raise ValueError(f"input size must be positive, got {h}x{w}")
        p = _PAPER[task]
        sy, sx = h / p["ref"][0], w / p["ref"][1]
        work = (max(1, _round(p["work"][0] * sy)), max(1, _round(p["work"][1] * sx)))

        def scale(ks: Sequence[Kernel]) -> Tuple[Kernel, ...]:
            return tuple((min(work[0], max(1, _round(kh * sy))), min(work[1], max(1, _round(kw * sx))))
                         for kh, kw in ks)

        return cls(work_size=work, kernels_shallow=scale(p["shallow"]), kernels_deep=scale(p["deep"]),
                   mode=mode)

    @property
    def interp(self) -> str:
        """Interpolation used for resizing in this mode."""
        return _INTERP[self.mode]


def resize(t: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a (N,C,H,W) map to ``size``; ``mode`` is an SPR mode or an interpolation name.

    A no-op when the map already has that size (both interpolations are then the identity).
    """
    if mode not in _INTERP:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {sorted(_INTERP)}")
    size = (int(size[0]), int(size[1]))
    if tuple(t.shape[-2:]) == size:
        return t
    interp = _INTERP[mode]
    if interp == "bilinear":
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(t, size=size, mode="nearest")


def to_work(feature: torch.Tensor, cfg: SPRConfig) -> torch.Tensor:
    """A hooked feature map (N,C,h,w) resized to the working size: the space statistics live in."""
    if feature.dim() != 4:
        raise ValueError(f"expected a (N,C,H,W) feature map, got shape {tuple(feature.shape)}")
    return resize(feature, cfg.work_size, cfg.mode)


def zscore(h: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel standardisation ``(h - mu) / (sigma + eps)`` of a (N,C,H,W) map; mu, sigma (C,)."""
    c = h.shape[1]
    if mu.numel() != c or sigma.numel() != c:
        raise ValueError(f"statistics have {mu.numel()}/{sigma.numel()} channels, feature map has {c}")
    mu = mu.to(device=h.device, dtype=h.dtype).view(1, c, 1, 1)
    sigma = sigma.to(device=h.device, dtype=h.dtype).view(1, c, 1, 1)
    return (h - mu) / (sigma + eps)


def box_mean(z: torch.Tensor, kernel: Kernel, mode: str) -> torch.Tensor:
    """Stride-1 box average of (N,C,H,W) ``z``: 'same' keeps HxW, 'demo' gives (H-kh+1)x(W-kw+1)."""
    kh, kw = int(kernel[0]), int(kernel[1])
    if mode == "same":
        ph, pw = kh // 2, kw // 2
        z = F.avg_pool2d(z, (2 * ph + 1, 1), stride=1, padding=(ph, 0), count_include_pad=False)
        return F.avg_pool2d(z, (1, 2 * pw + 1), stride=1, padding=(0, pw), count_include_pad=False)
    if mode == "demo":
        if kh > z.shape[-2] or kw > z.shape[-1]:
            raise ValueError(f"kernel {kernel} larger than the map {tuple(z.shape[-2:])} in 'demo' mode")
        return F.avg_pool2d(F.avg_pool2d(z, (kh, 1), stride=1), (1, kw), stride=1)
    raise ValueError(f"SPR mode must be one of {MODES}, got {mode!r}")


def pooled_map(z: torch.Tensor, kernel: Kernel, mode: str = "same") -> torch.Tensor:
    """One SPR term p_i = R(|AvgPool_k(z)|).mean(over channels) -> (N,1,HR,WR) at z's size."""
    p = box_mean(z, kernel, mode).abs().mean(dim=1, keepdim=True)
    return resize(p, (z.shape[-2], z.shape[-1]), mode)      # identity in 'same' mode


def cascade(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """H = p_1; H = H / (1 + max(H)) * p_i for i >= 2, max taken per sample."""
    if len(terms) == 0:
        raise ValueError("the SPR cascade needs at least one term")
    heat = terms[0]
    for p in terms[1:]:
        peak = heat.amax(dim=(1, 2, 3), keepdim=True)
        heat = heat / (1.0 + peak) * p
    return heat


def spr_heatmap(z: torch.Tensor, kernels: Sequence[Kernel], mode: str = "same") -> torch.Tensor:
    """SPR cascade over ``kernels`` (applied in the given order, largest first) -> (N,1,HR,WR)."""
    if z.dim() != 4:
        raise ValueError(f"expected a (N,C,H,W) z-map, got shape {tuple(z.shape)}")
    if not kernels:
        raise ValueError("spr_heatmap needs at least one kernel")
    return cascade([pooled_map(z, k, mode) for k in kernels])


def layer_heatmap(feature: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, kernels: Sequence[Kernel],
                  cfg: SPRConfig, eps: float = 1e-5) -> torch.Tensor:
    """Heatmap of one hooked layer: resize to the working size, z-score, SPR -> (N,1,HR,WR)."""
    return spr_heatmap(zscore(to_work(feature, cfg), mu, sigma, eps), kernels, cfg.mode)


def aggregate(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise maximum over per-layer heatmaps (all (N,1,HR,WR))."""
    if len(maps) == 0:
        raise ValueError("aggregate needs at least one map")
    out = maps[0]
    for m in maps[1:]:
        out = torch.maximum(out, m)
    return out
