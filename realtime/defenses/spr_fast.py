"""All SPR box filters of one z-map from running sums (the fast plain-torch path, CPU and GPU).

``spr.box_mean`` pools once per kernel with ``avg_pool2d``, whose cost grows with the kernel; on the
2-core CPU the four shallow kernels of a 128-channel 53x70 map took ~95 ms against ~22 ms here
(measured, one thread, machine shared). Here each axis is a prefix sum (``cumsum``) and a box of any
size is the difference of two shifted slices of it: the column prefix sum is shared by every kernel,
the row prefix sum is taken once per kernel on the column-boxed map. Same windows as ``spr.py``:

* ``"same"``: window ``[i - k//2, i + k//2]`` clipped to the map, divided by the clipped pixel count
  (the prefix sum is edge-extended by ``k//2`` so the clipped windows are plain slices);
* ``"demo"``: unpadded windows (the map shrinks to ``H-kh+1 x W-kw+1``), then a nearest resize back.

Prefix sums run along ONE axis at a time (at most a few hundred terms of z-scores), so fp32 keeps
the reference's precision (measured relative error < 1e-6 on 150x300 maps). ``spr.py`` stays the
oracle: tests check this module against it.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from .spr import MODES, Kernel, resize


def prefix_sum(z: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive cumsum along ``dim`` (-1 or -2) with a leading zero: size n+1 along that axis."""
    pad = (1, 0) if dim == -1 else (0, 0, 1, 0)
    return F.pad(z.cumsum(dim), pad)


def box_from_prefix(c: torch.Tensor, k: int, dim: int, mode: str) -> torch.Tensor:
    """Box means of width ``k`` along ``dim`` from its prefix sum ``c`` (see the module docstring)."""
    n = c.shape[dim] - 1
    if mode == "demo":
        if k > n:
            raise ValueError(f"kernel {k} larger than the map side {n} in 'demo' mode")
        m = n - k + 1
        return (c.narrow(dim, k, m) - c.narrow(dim, 0, m)) / k
    if mode != "same":
        raise ValueError(f"SPR mode must be one of {MODES}, got {mode!r}")
    r = k // 2
    if r:
        edge = list(c.shape)
        edge[dim] = r
        c = torch.cat([c.narrow(dim, 0, 1).expand(edge), c, c.narrow(dim, n, 1).expand(edge)], dim)
    i = torch.arange(n, device=c.device)
    count = ((i + r + 1).clamp(max=n) - (i - r).clamp(min=0)).to(c.dtype)
    shape = [1] * c.dim()
    shape[dim] = n
    return (c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)) / count.view(shape)


def box_means(z: torch.Tensor, kernels: Sequence[Kernel], mode: str = "same") -> List[torch.Tensor]:
    """``[spr.box_mean(z, k, mode) for k in kernels]`` with one shared column prefix sum."""
    if z.dim() != 4:
        raise ValueError(f"expected a (N,C,H,W) z-map, got shape {tuple(z.shape)}")
    cols = prefix_sum(z, -2)
    return [box_from_prefix(prefix_sum(box_from_prefix(cols, int(kh), -2, mode), -1), int(kw), -1, mode)
            for kh, kw in kernels]


def pooled_maps(z: torch.Tensor, kernels: Sequence[Kernel], mode: str = "same") -> List[torch.Tensor]:
    """``[spr.pooled_map(z, k, mode) for k in kernels]``: |box mean| averaged over channels, at z's size."""
    size = (z.shape[-2], z.shape[-1])
    return [resize(b.abs().mean(dim=1, keepdim=True), size, mode) for b in box_means(z, kernels, mode)]


__all__ = ["box_from_prefix", "box_means", "pooled_maps", "prefix_sum"]
