"""Fused Z-Mask on the GPU: the same outputs as ``ZMask.heatmaps`` / ``ZMask.detect`` in a handful of launches.

Per call: one zeroed workspace (cascade maxima + score sums), then per layer ``zm_pooled_*`` and
``zm_reduce_layer``, then ``zm_fuse`` and (detect) ``zm_mask``: 2L + 3 launches for L hooked layers,
all on torch's current stream, no host synchronisation. Inference only (no autograd): outputs are
float32 whatever the taps' dtype (fp16 taps are read as fp16 and accumulated in fp32/fp64).
Device copies of the statistics, the layer table and the fusion scalars are cached and refreshed
when the source tensors change (data pointer or in-place version).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from realtime.defenses import ChannelStats, Detection, FusionBlock, ZMaskConfig
from realtime.defenses.fusion import PARAM_NAMES

from . import runtime
from .launch import (DTYPES, LMAX, MODE_CODES, REC, DeviceLimits, PooledPlan, check_batch, check_stats, check_tap,
                     pack_layers, plan_pooled, pointwise_grid)
from .runtime import ptr

EPS = 1e-5   # spr.zscore's default, which ZMask uses


def _version(t: torch.Tensor) -> int:
    """In-place modification counter (-1 for inference tensors, which keep none: treated as constant)."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


@dataclass
class _DeviceConsts:
    key: Tuple[Any, ...]
    mu: List[torch.Tensor]
    sigma: List[torch.Tensor]
    table: torch.Tensor          # int32: records then kernel pairs (launch.LayerTable.ints)


class FusedZMask:
    """Launches the fused kernels for one (ZMaskConfig, ChannelStats).

    ``limits``/``threads``/``chunk``/``force_global`` override the launch plan (tests use them to
    exercise the shared-memory, global-scratch and multi-slab paths); ``check_finite`` rejects NaN/inf
    taps at the cost of one device sync per layer."""

    def __init__(self, cfg: ZMaskConfig, stats: ChannelStats, *, limits: Optional[DeviceLimits] = None,
                 threads: Optional[int] = None, chunk: Optional[int] = None, force_global: bool = False,
                 check_finite: bool = False) -> None:
        missing = [n for n in cfg.layers if n not in stats.mu or n not in stats.sigma]
        if missing:
            raise KeyError(f"channel statistics missing for layers {missing}; have {sorted(stats.mu)}")
        self.cfg, self.stats = cfg, stats
        self.table = pack_layers(cfg.shallow, cfg.deep, cfg.spr.kernels_shallow, cfg.spr.kernels_deep)
        self.channels = [check_stats(s.name, stats.mu[s.name], stats.sigma[s.name]) for s in self.table.layers]
        self.limits, self.threads, self.chunk, self.force_global = limits, threads, chunk, force_global
        self.check_finite = check_finite
        self._consts: Dict[torch.device, _DeviceConsts] = {}
        self._fusion: Dict[torch.device, Tuple[Tuple[Any, ...], torch.Tensor]] = {}
        self._plans: Dict[Tuple[Any, ...], List[PooledPlan]] = {}

    # ------------------------------------------------------------------ cached device constants
    def _stats_key(self) -> Tuple[Any, ...]:
        return tuple((t.data_ptr(), _version(t)) for s in self.table.layers
                     for t in (self.stats.mu[s.name], self.stats.sigma[s.name]))

    def _device_consts(self, device: torch.device) -> _DeviceConsts:
        key = self._stats_key()
        got = self._consts.get(device)
        if got is None or got.key != key:
            mu = [self.stats.mu[s.name].detach().to(device, torch.float32).reshape(-1).contiguous()
                  for s in self.table.layers]
            sigma = [self.stats.sigma[s.name].detach().to(device, torch.float32).reshape(-1).contiguous()
                     for s in self.table.layers]
            self.channels = [check_stats(s.name, m, g) for s, m, g in zip(self.table.layers, mu, sigma)]
            table = torch.tensor(self.table.ints(), dtype=torch.int32).to(device)
            got = self._consts[device] = _DeviceConsts(key, mu, sigma, table)
        return got

    def _fusion_params(self, fusion: FusionBlock, device: torch.device) -> torch.Tensor:
        params = [getattr(fusion, n) for n in PARAM_NAMES]
        key = tuple((p.data_ptr(), _version(p), p.device) for p in params)
        got = self._fusion.get(device)
        if got is None or got[0] != key:
            vec = torch.stack([p.detach().reshape(()).to(device, torch.float32) for p in params]).contiguous()
            got = self._fusion[device] = (key, vec)
        return got[1]

    # ------------------------------------------------------------------ launches
    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"the fused kernels need CUDA taps, got {device}; use the reference path on CPU")

    def plans(self, n: int, limits: DeviceLimits) -> List[PooledPlan]:
        """The pooled-map launch plan of every layer for a batch of ``n`` (cached)."""
        key = (n, limits, tuple(self.channels))
        if key not in self._plans:
            self._plans[key] = [plan_pooled(n, c, self.cfg.spr.work_size, len(s.kernels), limits, self.threads,
                                            self.chunk, self.force_global)
                                for s, c in zip(self.table.layers, self.channels)]
        return self._plans[key]

    def _pooled(self, taps: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                _DeviceConsts]:
        """Launch pooled + reduce for every layer: (P (N,ktot,HR,WR), qmax int32, score sums f64, consts)."""
        layers = self.table.layers
        n = check_batch(taps, self.cfg.layers)
        device = taps[layers[0].name].device
        self._check_device(device)
        maps = [check_tap(s.name, taps[s.name], c, device, self.check_finite) for s, c in zip(layers, self.channels)]
        consts = self._device_consts(device)
        plans = self.plans(n, self.limits or runtime.device_limits(device))
        hr, wr = self.cfg.spr.work_size
        hw, nl = hr * wr, len(layers)
        pall = torch.empty((n, self.table.ktot, hr, wr), dtype=torch.float32, device=device)
        zeros = torch.zeros(2 * n + math.ceil(n * nl * 2 * LMAX / 2), dtype=torch.float64, device=device)
        sums, qmax = zeros[:2 * n], zeros[2 * n:].view(torch.int32)
        partial = torch.empty(max(p.partial_floats for p in plans), dtype=torch.float32, device=device)
        need = max(p.scratch_doubles for p in plans)
        scratch = torch.empty(need, dtype=torch.float64, device=device) if need else None
        i32, i64 = np.int32, np.int64
        for l, (spec, plan, t) in enumerate(zip(layers, plans, maps)):
            c, h, w = t.shape[1], t.shape[2], t.shape[3]
            runtime.launch(device, "zm_pooled_" + DTYPES[t.dtype], (plan.grid, 1, 1), (plan.threads, 1, 1), (
                ptr(t), *(i64(s) for s in t.stride()), ptr(consts.mu[l]), ptr(consts.sigma[l]), np.float32(EPS),
                i32(n), i32(c), i32(h), i32(w), i32(hr), i32(wr), i32(MODE_CODES[self.cfg.spr.mode]),
                ptr(consts.table, 4 * self.table.kernel_offset(l)), i32(len(spec.kernels)), i32(plan.chunk),
                i32(plan.n_chunks), i32(plan.sats), i32(plan.n_slabs), i32(plan.pitch),
                ptr(scratch if not plan.use_shared else None), ptr(partial)), plan.shared_bytes)
            grid, block = pointwise_grid(hw, n)
            runtime.launch(device, "zm_reduce_layer", grid, block, (
                ptr(partial), i32(plan.n_chunks), i32(c), i32(hw), ptr(pall), i32(self.table.ktot),
                ptr(consts.table, 4 * REC * l), ptr(qmax), i32(l), i32(nl)))
        return pall, qmax, sums, consts

    def pooled_maps(self, taps: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per layer, its distinct kernels' pooled maps p_k (N,K_l,HR,WR) (``spr.pooled_map`` each)."""
        pall = self._pooled(taps)[0]
        return {s.name: pall[:, off:off + len(s.kernels)] for s, off in zip(self.table.layers, self.table.koff)}

    def _fuse(self, taps: Dict[str, torch.Tensor], fusion: Optional[FusionBlock]
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        pall, qmax, sums, consts = self._pooled(taps)
        device, n = pall.device, pall.shape[0]
        hr, wr = self.cfg.spr.work_size
        out = torch.empty((3 if fusion is not None else 2, n, 1, hr, wr), dtype=torch.float32, device=device)
        soft = out[2] if fusion is not None else None
        fvec = self._fusion_params(fusion, device) if fusion is not None else None
        grid, block = pointwise_grid(hr * wr, n)
        runtime.launch(device, "zm_fuse", grid, block, (
            ptr(pall), np.int32(self.table.ktot), np.int32(hr * wr), ptr(consts.table),
            np.int32(len(self.table.layers)), ptr(qmax), ptr(fvec), ptr(out[0]), ptr(out[1]), ptr(soft), ptr(sums)))
        return out[0], out[1], soft, sums

    def heatmaps(self, taps: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(H_S, H_D), each (N,1,HR,WR) float32: ``ZMask.heatmaps`` on the GPU."""
        h_s, h_d, _, _ = self._fuse(taps, None)
        return h_s, h_d

    def detect(self, taps: Dict[str, torch.Tensor], size: Tuple[int, int], fusion: FusionBlock,
               lambda0: float, mask_threshold: float = 0.5) -> Detection:
        """``ZMask.detect`` on the GPU: heatmaps, soft mask, score, flags, keep-mask at ``size``."""
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise ValueError(f"mask size must be positive, got {size}")
        if not all(math.isfinite(v) for v in (lambda0, mask_threshold)):
            raise ValueError(f"lambda0 and mask_threshold must be finite, got {lambda0}, {mask_threshold}")
        h_s, h_d, soft, sums = self._fuse(taps, fusion)
        assert soft is not None
        device, n = h_s.device, h_s.shape[0]
        hr, wr = self.cfg.spr.work_size
        score = torch.empty(n, dtype=torch.float32, device=device)
        flagged = torch.empty(n, dtype=torch.uint8, device=device)
        mask = torch.empty((n, 1, height, width), dtype=torch.float32, device=device)
        grid, block = pointwise_grid(height * width, n)
        runtime.launch(device, "zm_mask", grid, block, (
            ptr(soft), np.int32(hr), np.int32(wr), ptr(sums), np.float32(lambda0), np.float32(mask_threshold),
            np.int32(MODE_CODES[self.cfg.spr.mode]), np.int32(height), np.int32(width), ptr(score), ptr(flagged),
            ptr(mask)))
        return Detection(h_s, h_d, soft, score, flagged.view(torch.bool), mask)


_ENGINES: Dict[int, Tuple["weakref.ref[ChannelStats]", Dict[ZMaskConfig, FusedZMask]]] = {}


def engine_for(cfg: ZMaskConfig, stats: ChannelStats) -> FusedZMask:
    """A cached engine per (stats object, cfg); dropped when the stats object is collected."""
    key = id(stats)
    entry = _ENGINES.get(key)
    if entry is None or entry[0]() is not stats:
        entry = _ENGINES[key] = (weakref.ref(stats, lambda _ref, k=key: _ENGINES.pop(k, None)), {})
    per = entry[1]
    if cfg not in per:
        per[cfg] = FusedZMask(cfg, stats)
    return per[cfg]


def fused_heatmaps(cfg: ZMaskConfig, stats: ChannelStats, taps: Dict[str, torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H_S, H_D) like ``ZMask.heatmaps`` (float32, no autograd), from CUDA taps."""
    return engine_for(cfg, stats).heatmaps(taps)


def fused_detect(zmask: Any, taps: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Detection:
    """``zmask.detect(taps, size)`` computed by the fused kernels (float32, no autograd)."""
    return engine_for(zmask.cfg, zmask.stats).detect(taps, size, zmask.fusion, zmask.cfg.lambda0,
                                                     zmask.cfg.mask_threshold)


__all__ = ["FusedZMask", "engine_for", "fused_detect", "fused_heatmaps"]
