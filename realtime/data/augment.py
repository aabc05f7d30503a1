"""Batched training augmentation that runs wherever the data lives (GPU or CPU).

Random scale + crop + horizontal flip are one affine resampling per sample (bilinear for the image,
nearest for the label, void outside the source frame), followed by colour jitter and, when enabled, the
capture effects a camera adds (Gaussian blur, sensor noise, JPEG): a model that has seen them leans less
on one drive's look. Random draws come from a ``torch.Generator`` on the CPU, so a seed gives the same
crops on any device; a disabled effect draws nothing, so older recipes replay exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import cv2
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
    blur: float = 0.0                           # probability of a Gaussian blur, sigma uniform in blur_sigma
    blur_sigma: Tuple[float, float] = (0.5, 1.5)
    noise: float = 0.0                          # max std of additive Gaussian noise (uniform in [0, noise])
    jpeg: float = 0.0                           # probability of a JPEG round trip, quality uniform in jpeg_quality
    jpeg_quality: Tuple[int, int] = (30, 90)

    def __post_init__(self) -> None:
        for name in ("blur", "jpeg"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.noise < 0 or not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"noise must be >= 0 and jpeg_quality within 1..100, got {self.noise}, {self.jpeg_quality}")


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
    return capture_effects(x.clamp_(0, 1), cfg, gen), lab


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B,3,H,W), one sigma per sample (radius 3 sigma, reflect padding)."""
    r = max(int(torch.ceil(sigma.max() * 3)), 1)
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)            # (B*3, 2r+1): one kernel per channel
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def capture_effects(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and JPEG on float [0,1] (B,3,H,W), each per sample with its configured odds."""
    b = x.shape[0]
    if cfg.blur > 0:
        pick = torch.rand(b, generator=gen) < cfg.blur
        sigma = _uniform(b, *cfg.blur_sigma, gen)
        if bool(pick.any()):
            idx = torch.nonzero(pick).flatten().to(x.device)
            x = x.index_copy(0, idx, _gaussian_blur(x.index_select(0, idx), sigma[pick].to(x.device)))
    if cfg.noise > 0:
        std = _uniform(b, 0.0, cfg.noise, gen).to(x.device).view(b, 1, 1, 1)
        z = torch.randn(x.shape, generator=gen).to(x.device)
        x = (x + std * z).clamp_(0, 1)
    if cfg.jpeg > 0:
        pick = torch.rand(b, generator=gen) < cfg.jpeg
        qual = torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (b,), generator=gen)
        for i in torch.nonzero(pick).flatten().tolist():                # OpenCV's codec, on the CPU
            u8 = x[i].mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()
            ok, buf = cv2.imencode(".jpg", u8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(qual[i])])   # RGB -> BGR
            if not ok:
                raise RuntimeError("OpenCV could not JPEG-encode a training crop")
            back = torch.from_numpy(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()).permute(2, 0, 1)
            x[i] = back.to(x.device, x.dtype) / 255
    return x


def resize_batch(images: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Evaluation-time resize of uint8 batches to ``size`` (bilinear image, nearest label)."""
    x = images.float() / 255
    if tuple(x.shape[-2:]) == tuple(size):
        return x, labels.long()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    lab = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return x, lab
