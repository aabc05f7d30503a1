"""Batched training augmentation that runs wherever the data lives (GPU or CPU).

Random scale + crop + horizontal flip are one affine resampling per sample (bilinear for the image,
nearest for the label, void outside the source frame), followed by colour jitter. Random draws come
from a ``torch.Generator`` on the CPU, so a seed gives the same crops on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .camvid import IGNORE_INDEX


@dataclass
class AugmentConfig:
    crop: Tuple[int, int] = (360, 480)          # output (h, w)
    scale: Tuple[float, float] = (0.5, 2.0)     # relative to the source frame
    base_scale: float = 1.0                     # fixed factor (e.g. 0.5 to train at half resolution)
    flip: bool = True
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment_batch(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``images`` uint8 (B,3,H,W), ``labels`` uint8/int (B,H,W) -> float [0,1] (B,3,h,w), int64 (B,h,w)."""
    b, _, H, W = images.shape
    ch, cw = cfg.crop
    dev = images.device
    s = _uniform(b, *cfg.scale, gen) * cfg.base_scale                   # scaled frame = (H*s, W*s)
    ox = torch.rand(b, generator=gen) * (W * s - cw)                     # crop offset in scaled pixels;
    oy = torch.rand(b, generator=gen) * (H * s - ch)                     # negative -> crop larger than frame
    flip = (torch.rand(b, generator=gen) < 0.5) if cfg.flip else torch.zeros(b, dtype=torch.bool)
    jit = torch.stack([_uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen),
                       _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen),
                       _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen)], 1)
    s, ox, oy, flip, jit = (t.to(dev) for t in (s, ox, oy, flip, jit))

    j = torch.arange(cw, device=dev, dtype=torch.float32)
    j = torch.where(flip[:, None], cw - 1 - j[None], j[None])           # (B, cw)
    i = torch.arange(ch, device=dev, dtype=torch.float32)[None]          # (1, ch)
    gx = 2 * (ox[:, None] + j + 0.5) / (s[:, None] * W) - 1              # normalised source coords
    gy = 2 * (oy[:, None] + i + 0.5) / (s[:, None] * H) - 1
    grid = torch.stack([gx[:, None, :].expand(b, ch, cw), gy[:, :, None].expand(b, ch, cw)], -1)

    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) / 255
    lab = F.grid_sample(labels[:, None].float() + 1, grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[:, 0].long() - 1
    lab[lab < 0] = IGNORE_INDEX

    bright, contrast, sat = (jit[:, k].view(b, 1, 1, 1) for k in range(3))
    x = x * bright
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = gray + (x - gray) * sat
    return x.clamp_(0, 1), lab


def resize_batch(images: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Evaluation-time resize of uint8 batches to ``size`` (bilinear image, nearest label)."""
    x = images.float() / 255
    if tuple(x.shape[-2:]) == tuple(size):
        return x, labels.long()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    lab = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return x, lab
