"""Launch planning, table packing and input checks of the fused kernels (kernels/launch.py), on CPU."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from kernels import launch as L
from kernels.launch import DeviceLimits, PooledPlan, pack_layers, plan_pooled

CU = Path(__file__).resolve().parents[1] / "kernels" / "zmask_spr.cu"
H100 = DeviceLimits.for_arch((9, 0), 132)
ORIN = DeviceLimits.for_arch((8, 7), 16)
TURING = DeviceLimits.for_arch((7, 5), 40)


def test_constants_mirror_the_cuda_defines() -> None:
    defines = dict(re.findall(r"^#define (ZM_\w+) (\d+)\b", CU.read_text(), flags=re.M))
    assert int(defines["ZM_PPT"]) == L.PPT
    assert int(defines["ZM_KG"]) == L.KG
    assert int(defines["ZM_LMAX"]) == L.LMAX
    assert int(defines["ZM_THREADS_MAX"]) == L.THREADS_MAX
    assert "#define ZM_REC (4 + 2 * ZM_LMAX)" in CU.read_text() and L.REC == 4 + 2 * L.LMAX


def test_device_limits_table_and_errors() -> None:
    assert H100.smem_optin == 232448 and ORIN.smem_optin == 166912 and TURING.smem_optin == 65536
    assert DeviceLimits.for_arch((99, 9), 4).smem_optin == L.SMEM_DEFAULT          # unknown arch: safe default
    assert DeviceLimits.for_arch((9, 0), 132, smem_optin=1000).smem_optin == 1000  # queried value wins
    assert H100.target_blocks == 264
    with pytest.raises(ValueError):
        DeviceLimits((9, 0), 0, 1000)
    with pytest.raises(ValueError):
        DeviceLimits((9, 0), 1, -1)


# --------------------------------------------------------------------------- layer table

def test_pack_layers_shipped_layout() -> None:
    ks, kd = ((23, 30), (11, 15), (6, 8), (3, 4)), ((23, 30), (11, 15))
    t = pack_layers(("layer3", "layer4_", "layer2"), ("layer3", "layer2"), ks, kd)
    assert [s.name for s in t.layers] == ["layer3", "layer4_", "layer2"]
    l3, l4, l2 = t.layers
    assert l3.kernels == ks and l3.shallow == (0, 1, 2, 3) and l3.deep == (0, 1)   # K_D reuses K_S's terms
    assert l4.shallow == (0, 1, 2, 3) and l4.deep == ()
    assert t.koff == (0, 4, 8) and t.ktot == 12
    ints = t.ints()
    assert len(ints) == 3 * L.REC + 2 * 12
    rec1 = ints[L.REC:2 * L.REC]
    assert rec1[:4] == [4, 4, 4, 0] and rec1[4:8] == [0, 1, 2, 3]
    rec2 = ints[2 * L.REC:3 * L.REC]
    assert rec2[:4] == [8, 4, 4, 2] and rec2[4 + L.LMAX:4 + L.LMAX + 2] == [0, 1]
    off = t.kernel_offset(2)
    assert ints[off:off + 8] == [23, 30, 11, 15, 6, 8, 3, 4]


def test_pack_layers_deep_only_and_non_prefix_kernels() -> None:
    t = pack_layers(("a",), ("a", "b"), ((5, 5), (3, 3)), ((7, 7), (3, 3)))
    a, b = t.layers
    assert a.kernels == ((5, 5), (3, 3), (7, 7)) and a.shallow == (0, 1) and a.deep == (2, 1)
    assert b.kernels == ((7, 7), (3, 3)) and b.shallow == () and b.deep == (0, 1)
    assert t.koff == (0, 3) and t.ktot == 5


def test_pack_layers_rejects_bad_kernels() -> None:
    with pytest.raises(ValueError, match="at most"):
        pack_layers(("a",), ("a",), tuple((k, k) for k in range(1, L.LMAX + 2)), ((1, 1),))
    with pytest.raises(ValueError, match=">= 1"):
        pack_layers(("a",), ("a",), ((0, 3),), ((1, 1),))
    with pytest.raises(ValueError, match="at least one"):
        pack_layers(("a",), ("a",), (), ((1, 1),))


# --------------------------------------------------------------------------- plans

def test_plan_camvid_grid_is_one_shared_slab() -> None:
    p = plan_pooled(1, 64, (53, 70), 4, H100)
    assert p.use_shared and p.n_slabs == 1 and p.threads == 480        # 3710 px / 8 per thread -> 15 warps
    assert p.pitch == 71 and p.shared_bytes == 54 * 71 * 8 <= L.SMEM_DEFAULT
    assert p.chunk == 1 and p.n_chunks == 64 and p.items == 64 and p.grid == 64
    assert p.partial_floats == 64 * 4 * 53 * 70


def test_plan_cityscapes_grid_uses_global_scratch() -> None:
    p = plan_pooled(1, 64, (150, 300), 4, H100)
    assert not p.use_shared and p.shared_bytes == 0
    assert p.threads == 512 and p.n_slabs == math.ceil(45000 / (512 * L.PPT)) == 11
    assert p.chunk == p.sats                                             # required with several slabs
    assert p.scratch_doubles == p.grid * p.sats * 151 * 301
    assert p.scratch_doubles * 8 <= L.SCRATCH_CAP


def test_plan_shared_memory_follows_the_architecture() -> None:
    # one double SAT of 90x100 is 91*101*8 = 73528 bytes: over Turing's 64 KiB, under Orin's opt-in
    assert not plan_pooled(1, 8, (90, 100), 2, TURING).use_shared
    p = plan_pooled(1, 8, (90, 100), 2, ORIN)
    assert p.use_shared and p.shared_bytes == 91 * 101 * 8 > L.SMEM_DEFAULT and p.sats == 1
    assert not plan_pooled(1, 8, (90, 100), 2, ORIN, force_global=True).use_shared


def test_plan_small_grids_hold_several_sats_and_chunk_large_batches() -> None:
    p = plan_pooled(32, 256, (20, 20), 4, H100)
    assert p.use_shared and p.chunk == (32 * 256) // 264 and p.sats == min(p.chunk, L.SMEM_DEFAULT // (21 * 21 * 8))
    assert p.sats > 1 and p.items >= H100.target_blocks and p.grid == H100.target_blocks


def test_plan_respects_a_small_shared_memory_limit() -> None:
    tiny = DeviceLimits.for_arch((7, 5), 4, smem_optin=8192)
    p = plan_pooled(16, 64, (17, 9), 4, tiny)                            # 18*11*8 = 1584 bytes per SAT
    assert p.use_shared and p.shared_bytes <= 8192 and p.sats == min(p.chunk, 8192 // 1584)
    assert not plan_pooled(1, 64, (53, 70), 4, tiny).use_shared


def test_plan_forced_slabs_keep_chunk_equal_to_sats() -> None:
    p = plan_pooled(2, 16, (53, 70), 6, H100, threads=32, chunk=4)
    assert p.n_slabs == math.ceil(3710 / 256) and p.chunk == p.sats
    assert p.items == 2 * p.n_chunks * 2                                 # 6 kernels -> 2 groups of <= 4


@pytest.mark.parametrize("seed", range(6))
def test_plans_cover_every_pixel_and_channel(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n, c, k = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (9, 300, 9))
        hr, wr = (int(torch.randint(1, 200, (1,), generator=g)) for _ in range(2))
        lim = (H100, ORIN, TURING, DeviceLimits.for_arch((7, 5), 3, 8192))[int(torch.randint(0, 4, (1,), generator=g))]
        p = plan_pooled(n, c, (hr, wr), k, lim)
        assert p.n_slabs * p.threads * L.PPT >= hr * wr
        assert p.chunk * p.n_chunks >= c > p.chunk * (p.n_chunks - 1)
        assert p.grid <= min(p.items, lim.target_blocks)
        assert p.shared_bytes <= lim.smem_optin and p.scratch_doubles * 8 <= L.SCRATCH_CAP
        assert p.pitch % 2 == 1 and p.pitch >= wr + 1


def test_plan_rejects_bad_sizes_and_inconsistent_plans() -> None:
    with pytest.raises(ValueError):
        plan_pooled(1, 0, (10, 10), 1, H100)
    with pytest.raises(ValueError):
        plan_pooled(1, 4, (0, 10), 1, H100)
    good = dict(threads=128, chunk=2, n_chunks=2, sats=2, n_slabs=1, pitch=11, grid=2, items=2, shared_bytes=64,
                scratch_doubles=0, partial_floats=10)
    PooledPlan(**good)
    for bad in (dict(threads=100), dict(threads=1024), dict(sats=3), dict(n_slabs=2, sats=1),
                dict(scratch_doubles=5), dict(shared_bytes=0), dict(grid=3)):
        with pytest.raises(ValueError):
            PooledPlan(**{**good, **bad})


def test_pointwise_grid() -> None:
    assert L.pointwise_grid(3710, 2) == ((15, 2, 1), (256, 1, 1))
    with pytest.raises(ValueError):
        L.pointwise_grid(0, 1)
    with pytest.raises(ValueError, match="65535"):
        L.pointwise_grid(10, 70000)


# --------------------------------------------------------------------------- input checks

def test_check_tap_accepts_strided_fp32_fp16() -> None:
    t = torch.randn(2, 8, 5, 6)
    assert L.check_tap("a", t, 8) is t
    L.check_tap("a", t.half(), 8)
    L.check_tap("a", t.to(memory_format=torch.channels_last), 8)
    L.check_tap("a", t[:, :, ::2], 8)


@pytest.mark.parametrize("bad, err, match", [
    ([1.0], TypeError, "expected a tensor"),
    (torch.zeros(8, 5, 6), ValueError, "N,C,H,W"),
    (torch.zeros(1, 8, 5, 6, dtype=torch.bfloat16), TypeError, "float32 or float16"),
    (torch.zeros(1, 8, 5, 6, dtype=torch.int32), TypeError, "float32 or float16"),
    (torch.zeros(1, 7, 5, 6), ValueError, "7 channels"),
    (torch.zeros(1, 8, 0, 6), ValueError, "empty"),
])
def test_check_tap_errors(bad: object, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        L.check_tap("layerX", bad, 8)


def test_check_tap_nan_device_and_stats() -> None:
    t = torch.zeros(1, 2, 3, 3)
    t[0, 1, 1, 1] = float("nan")
    L.check_tap("a", t, 2)                                            # not checked unless asked (a sync)
    with pytest.raises(ValueError, match="NaN"):
        L.check_tap("a", t, 2, check_finite=True)
    with pytest.raises(ValueError, match="other taps on meta"):
        L.check_tap("a", torch.zeros(1, 2, 3, 3), 2, device=torch.device("meta"))
    assert L.check_stats("a", torch.zeros(4), torch.ones(4)) == 4
    with pytest.raises(ValueError, match="NaN"):
        L.check_stats("a", torch.tensor([0.0, float("nan")]), torch.ones(2))
    with pytest.raises(ValueError, match="negative"):
        L.check_stats("a", torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="channels"):
        L.check_stats("a", torch.zeros(2), torch.ones(3))


def test_check_batch() -> None:
    taps = {"a": torch.zeros(2, 1, 3, 3), "b": torch.zeros(2, 4, 3, 3)}
    assert L.check_batch(taps, ["a", "b"]) == 2
    with pytest.raises(KeyError, match="c"):
        L.check_batch(taps, ["a", "c"])
    with pytest.raises(ValueError, match="batch"):
        L.check_batch({**taps, "b": torch.zeros(3, 4, 3, 3)}, ["a", "b"])
