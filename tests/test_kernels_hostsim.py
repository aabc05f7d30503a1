"""The REAL zmask_spr.cu and the real Python launch code, run on the CPU by kernels/hostsim.cpp
(one fiber per CUDA thread, barriers and warp shuffles simulated), against the torch reference.

What this covers without a GPU: index arithmetic, shared/global SAT paths, slabs, chunks, kernel
groups, barriers (a divergent barrier or shuffle deadlocks and fails), argument order and types
(checked against each kernel's signature), workspace sizes (fresh buffers are NaN-filled, so a read
of anything the kernels did not write shows). What it cannot cover: real memory-model races between
warps (fibers interleave only at barriers), performance, the CUDA/CuPy runtime itself."""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import pytest
import torch

from kernels import fused as fused_mod
from kernels import hostsim, runtime
from kernels.fused import FusedZMask
from kernels.launch import DeviceLimits
from realtime.defenses import ChannelStats, FusionBlock, SPRConfig, ZMask, ZMaskConfig
from realtime.defenses.spr import pooled_map, to_work, zscore
from realtime.core.taps import EngineTaps

TOL = 1e-5
LIMITS = DeviceLimits.for_arch((9, 0), 4)


class _NaNTorch:
    """``torch`` for kernels/fused.py with ``empty`` returning NaN-filled (or 0x5A-filled int) buffers."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs) -> torch.Tensor:
        t = torch.empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(90)


class SimFused(FusedZMask):
    def _check_device(self, device: torch.device) -> None:   # CPU tensors stand in for device memory
        assert device.type == "cpu"


@pytest.fixture(autouse=True)
def sim(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        hostsim.build()
    except hostsim.HostSimUnavailable as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(runtime, "launch", hostsim.launch)
    monkeypatch.setattr(runtime, "device_limits", lambda device: LIMITS)
    monkeypatch.setattr(fused_mod, "torch", _NaNTorch())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert not torch.isnan(a).any(), "kernel output has NaNs (unwritten or uninitialised memory read)"
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _one_layer(mode: str, work, ks, c: int, fsize, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, c, *fsize, generator=g) * 2 + 0.5
    f[-1, :, : max(1, fsize[0] // 2), : max(1, fsize[1] // 3)] += 9.0
    cfg = ZMaskConfig(("a",), ("a",), SPRConfig(work, ks, ks[:2], mode))
    stats = ChannelStats({"a": torch.randn(c, generator=g) * 0.3}, {"a": torch.rand(c, generator=g) + 0.3})
    return cfg, stats, {"a": f}


CASES = [
    ("same", (9, 12), ((5, 6), (2, 3), (1, 1)), 5, (7, 10)),
    ("demo", (9, 12), ((5, 6), (9, 12), (2, 2), (1, 1), (3, 7)), 3, (18, 24)),      # 5 kernels: 2 groups
    ("same", (13, 5), ((30, 2), (4, 4)), 4, (13, 5)),                               # kernel beyond the grid
    ("demo", (11, 40), ((6, 20), (2, 3)), 3, (5, 17)),                              # 40 > 32: two scan tiles
]
PATHS = {"default": {}, "global": dict(force_global=True), "slabs": dict(threads=32),
         "chunks": dict(chunk=2), "global-slabs": dict(force_global=True, threads=32, chunk=2),
         "sats": dict(limits=DeviceLimits.for_arch((7, 5), 1, smem_optin=8192))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
@pytest.mark.parametrize("path", sorted(PATHS))
def test_pooled_maps(case: tuple, path: str) -> None:
    mode, work, ks, c, fsize = case
    cfg, stats, taps = _one_layer(mode, work, ks, c, fsize)
    eng = SimFused(cfg, stats, **PATHS[path])
    got = eng.pooled_maps(taps)["a"]
    z = zscore(to_work(taps["a"], cfg.spr), stats.mu["a"], stats.sigma["a"])
    for k, kern in enumerate(ks):
        assert rel(got[:, k:k + 1], pooled_map(z, kern, mode)) <= TOL, kern
    if path == "sats":
        assert eng.plans(2, PATHS["sats"]["limits"])[0].sats > 1


def test_fp16_and_strided_taps() -> None:
    cfg, stats, taps = _one_layer("same", (9, 12), ((5, 6), (2, 3)), 4, (7, 10))
    eng = SimFused(cfg, stats)
    z = zscore(to_work(taps["a"].half().float(), cfg.spr), stats.mu["a"], stats.sigma["a"])
    got = eng.pooled_maps({"a": taps["a"].half()})["a"]
    assert rel(got[:, :1], pooled_map(z, (5, 6))) <= TOL
    wide = torch.cat([taps["a"], taps["a"]], 3)[..., :10].to(memory_format=torch.channels_last)
    z = zscore(to_work(taps["a"], cfg.spr), stats.mu["a"], stats.sigma["a"])
    assert rel(eng.pooled_maps({"a": wide})["a"][:, 1:2], pooled_map(z, (2, 3))) <= TOL


def _toy(mode: str) -> Tuple[ZMask, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    sizes = {"a": (4, 12, 16), "b": (6, 6, 8), "c": (3, 24, 32)}
    taps = {k: torch.randn(2, *s, generator=g).abs() for k, s in sizes.items()}
    taps["a"][1, :, 3:8, 4:10] += 6.0
    spr = SPRConfig((9, 12), ((5, 6), (3, 3), (2, 2)), ((7, 7), (3, 3)), mode)
    cfg = ZMaskConfig(shallow=("a", "b", "c"), deep=("b", "c"), spr=spr, lambda0=0.05)
    stats = ChannelStats({k: torch.rand(s[0], generator=g) for k, s in sizes.items()},
                         {k: torch.rand(s[0], generator=g) + 0.5 for k, s in sizes.items()})
    return ZMask(EngineTaps(lambda x: (x, {}), cfg.layers), cfg, stats, FusionBlock(w3=2.0, b3=-0.5)), taps


@pytest.mark.parametrize("mode", ["same", "demo"])
def test_detect_matches_reference(mode: str) -> None:
    zm, taps = _toy(mode)
    ref = zm.detect(taps, (20, 27))
    got = SimFused(zm.cfg, zm.stats).detect(taps, (20, 27), zm.fusion, zm.cfg.lambda0, zm.cfg.mask_threshold)
    for name in ("h_s", "h_d", "soft_mask", "score"):
        assert rel(getattr(got, name), getattr(ref, name)) <= TOL, name
    assert got.flagged.dtype == torch.bool and torch.equal(got.flagged, ref.flagged) and bool(ref.flagged[1])
    assert got.mask.shape == ref.mask.shape and float((got.mask != ref.mask).float().mean()) <= 1e-3
    assert float((ref.mask == 0).sum()) > 0
    h_s, h_d = SimFused(zm.cfg, zm.stats).heatmaps(taps)
    assert rel(h_s, ref.h_s) <= TOL and rel(h_d, ref.h_d) <= TOL


def test_simulator_rejects_wrong_argument_types() -> None:
    out = torch.zeros(4)
    args = (runtime.ptr(out), np.int32(2), np.int32(2), np.int32(4), runtime.ptr(out), np.int32(1),
            runtime.ptr(out), runtime.ptr(out), np.int32(0), np.int32(1))
    with pytest.raises(RuntimeError, match="argument types"):
        hostsim.launch(torch.device("cpu"), "zm_reduce_layer", (1, 1, 1), (32, 1, 1), args[:-1] + (np.int64(1),))
    with pytest.raises(RuntimeError, match="argument types"):
        hostsim.launch(torch.device("cpu"), "zm_reduce_layer", (1, 1, 1), (32, 1, 1), args[:-1])


def test_cityscapes_grid_global_sats_and_slabs() -> None:
    """The paper's 150x300 grid: double SATs in global scratch, 11 pixel slabs, a 300-sigma patch."""
    ks = ((64, 128), (32, 64), (16, 32), (8, 16))
    cfg, stats, taps = _one_layer("same", (150, 300), ks, 2, (128, 256), n=1)
    taps["a"][:, :, 20:60, 30:100] += 300.0
    eng = SimFused(cfg, stats, limits=DeviceLimits.for_arch((9, 0), 132))
    plan = eng.plans(1, eng.limits)[0]
    assert not plan.use_shared and plan.n_slabs == 11
    got = eng.pooled_maps(taps)["a"]
    z = zscore(to_work(taps["a"], cfg.spr), stats.mu["a"], stats.sigma["a"])
    for k, kern in enumerate(ks):
        assert rel(got[:, k:k + 1], pooled_map(z, kern)) <= TOL, kern
