"""Passes over calibration frames: clean channel statistics, and per-layer SPR heatmaps.

Both use one forward pass per batch with every needed layer hooked (``ActivationTaps``), and work
on the SPR working grid, so the statistics live in exactly the space the heatmaps z-score in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Sequence, Tuple

import torch
from tqdm import tqdm

from realtime.defenses.stats import LayerStatsAccumulator
from realtime.defenses import ActivationTaps, ChannelStats, SPRConfig
from realtime.defenses.spr import spr_heatmap, to_work, zscore


def batches(images: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(start, float [0,1] batch on device)`` from uint8 or float frames."""
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device)
        yield s, (x.float() / 255 if x.dtype == torch.uint8 else x.float())


@torch.no_grad()
def channel_stats(model: torch.nn.Module, layers: Sequence[str], images: torch.Tensor, cfg: SPRConfig,
                  batch_size: int = 8, progress: bool = True) -> ChannelStats:
    """Pooled per-channel mean/std (streaming, float64) of each layer on clean ``images``."""
    dev = next(model.parameters()).device
    acc = LayerStatsAccumulator()
    with ActivationTaps(model, layers) as taps:
        n = (len(images) + batch_size - 1) // batch_size
        for _, x in tqdm(batches(images, batch_size, dev), total=n, desc="channel stats", unit="batch",
                         disable=not progress):
            _, maps = taps(x)
            acc.update({k: to_work(v.float(), cfg) for k, v in maps.items()})
    mu, sigma = acc.result()
    return ChannelStats(mu, sigma)


@dataclass
class LayerHeatmaps:
    """Per-layer heatmaps on the working grid, (N,1,HR,WR) each, with shallow and deep kernel sets."""
    shallow: Dict[str, torch.Tensor]
    deep: Dict[str, torch.Tensor]

    def cat(self, other: "LayerHeatmaps") -> "LayerHeatmaps":
        return LayerHeatmaps({k: torch.cat([v, other.shallow[k]]) for k, v in self.shallow.items()},
                             {k: torch.cat([v, other.deep[k]]) for k, v in self.deep.items()})


@torch.no_grad()
def layer_heatmaps(model: torch.nn.Module, layers: Sequence[str], images: torch.Tensor, stats: ChannelStats,
                   cfg: SPRConfig, batch_size: int = 8, desc: str = "heatmaps", progress: bool = True
                   ) -> LayerHeatmaps:
    """Heatmaps of every layer in ``layers`` for ``images`` (kept on the CPU: they are small)."""
    dev = next(model.parameters()).device
    st = stats.to(dev)
    out_s: Dict[str, list] = {k: [] for k in layers}
    out_d: Dict[str, list] = {k: [] for k in layers}
    with ActivationTaps(model, layers) as taps:
        n = (len(images) + batch_size - 1) // batch_size
        for _, x in tqdm(batches(images, batch_size, dev), total=n, desc=desc, unit="batch", disable=not progress):
            _, maps = taps(x)
            for k in layers:
                z = zscore(to_work(maps[k].float(), cfg), st.mu[k], st.sigma[k])     # once for both kernel sets
                out_s[k].append(spr_heatmap(z, cfg.kernels_shallow, cfg.mode).cpu())
                out_d[k].append(spr_heatmap(z, cfg.kernels_deep, cfg.mode).cpu())
    return LayerHeatmaps({k: torch.cat(v) for k, v in out_s.items()}, {k: torch.cat(v) for k, v in out_d.items()})
