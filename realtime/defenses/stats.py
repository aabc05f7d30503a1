"""Streaming per-channel statistics of tapped feature maps on clean frames (Z-Mask's mu/sigma).

Estimator: the pooled dataset mean and standard deviation over every pixel of every frame (at the
working size), merged batch by batch with Chan et al.'s parallel update of (count, mean, M2) in
float64. Unlike the authors' demo, which averages per-image spatial std, this is exactly the std of
the pooled pixels, independent of batch size and order (up to float rounding).
"""
from __future__ import annotations

from typing import Dict

import torch


class RunningChannelStats:
    """Per-channel count / mean / M2 for one layer; ``update`` takes (N,C,H,W) maps."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected (N,C,H,W) feature maps, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values in a clean feature map; statistics would be meaningless")
        x = x.detach().double()
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        n_b = flat.shape[1]
        mean_b = flat.mean(1)
        m2_b = ((flat - mean_b[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if self.mean.numel() != c:
            raise ValueError(f"channel count changed from {self.mean.numel()} to {c}")
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.count * n_b / n)
        self.count = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) as float32; sigma is the population std (divides by the pixel count)."""
        if self.mean is None:
            raise RuntimeError("no data seen")
        return self.mean.float(), (self.m2 / self.count).sqrt().float()


class LayerStatsAccumulator:
    """One RunningChannelStats per layer name."""

    def __init__(self) -> None:
        self.layers: Dict[str, RunningChannelStats] = {}

    def update(self, maps: Dict[str, torch.Tensor]) -> None:
        for name, x in maps.items():
            self.layers.setdefault(name, RunningChannelStats()).update(x)

    def result(self) -> tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        mu, sigma = {}, {}
        for name, acc in self.layers.items():
            mu[name], sigma[name] = acc.result()
        return mu, sigma
