"""Fused CUDA kernels against the plain-torch reference, on a GPU (skipped without one).

Tolerances (normwise relative error max|a-b| / max|b|):
* fp32 taps: 1e-4 for pooled maps, heatmaps, soft mask and score;
* fp16 taps: 1e-4 against the reference run on the same taps upcast to fp32 (the kernels read fp16
  exactly and accumulate in fp32/fp64), 2e-2 against the reference run in fp16 (which rounds every
  intermediate to fp16).
Keep-masks are thresholded, so they may differ where the upsampled soft mask is within rounding of
the threshold: at most 1e-3 of the pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

import kernels
from kernels.backend import heatmap_backend
from kernels.fused import FusedZMask
from kernels.launch import DeviceLimits
from realtime.defenses import ChannelStats, FusionBlock, SPRConfig, ZMask, ZMaskConfig
from realtime.defenses.spr import pooled_map, to_work, zscore
from realtime.core.taps import EngineTaps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEV = torch.device("cuda")
FP32, FP16_UP, FP16 = 1e-4, 1e-4, 2e-2


@pytest.fixture(autouse=True)
def _kernels_available() -> None:
    ok, why = kernels.available()
    if not ok:
        pytest.skip(why)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _one_layer(mode: str, work: Tuple[int, int], kernels_: Tuple[Tuple[int, int], ...], c: int, fsize: Tuple[int, int],
               n: int = 2, seed: int = 0) -> Tuple[ZMaskConfig, ChannelStats, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, c, *fsize, generator=g) * 2 + 0.5
    f[-1, :, fsize[0] // 4:fsize[0] // 2, fsize[1] // 3:fsize[1] // 2] += 20.0
    cfg = ZMaskConfig(("a",), ("a",), SPRConfig(work, kernels_, kernels_[:2], mode))
    stats = ChannelStats({"a": torch.randn(c, generator=g) * 0.3}, {"a": torch.rand(c, generator=g) + 0.3})
    return cfg, stats, {"a": f.to(DEV)}


CASES = [
    ("same", (53, 70), ((23, 30), (11, 15), (6, 8), (3, 4)), 64, (45, 60)),
    ("demo", (53, 70), ((23, 30), (11, 15), (6, 8), (3, 4)), 128, (23, 30)),
    ("same", (17, 9), ((40, 3), (2, 2), (1, 1), (16, 9), (3, 3)), 7, (5, 31)),     # 5 kernels: 2 groups
    ("demo", (31, 8), ((2, 2), (16, 4), (30, 7)), 33, (62, 16)),
]
PATHS = {"auto": {}, "global": dict(force_global=True), "slabs": dict(threads=64), "chunks": dict(chunk=5),
         "tiny-smem": dict(limits=DeviceLimits.for_arch((7, 5), 4, smem_optin=8192))}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_pooled_maps_parity(case: tuple, path: str) -> None:
    mode, work, ks, c, fsize = case
    cfg, stats, taps = _one_layer(mode, work, ks, c, fsize)
    got = FusedZMask(cfg, stats, **PATHS[path]).pooled_maps(taps)["a"]
    z = zscore(to_work(taps["a"], cfg.spr), stats.mu["a"].to(DEV), stats.sigma["a"].to(DEV))
    for k, kern in enumerate(ks):
        assert rel(got[:, k:k + 1], pooled_map(z, kern, mode)) <= FP32, (kern, path)


def test_cityscapes_grid_global_scratch_parity() -> None:
    cfg, stats, taps = _one_layer("same", (150, 300), ((64, 128), (32, 64), (16, 32), (8, 16)), 32, (128, 256))
    eng = FusedZMask(cfg, stats)
    assert not eng.plans(2, kernels.runtime.device_limits(DEV))[0].use_shared
    ref = ZMask(EngineTaps(lambda x: (x, {}), cfg.layers), cfg, stats)
    h_s, h_d = eng.heatmaps(taps)
    r_s, r_d = ref.reference_heatmaps(taps)
    assert rel(h_s, r_s) <= FP32 and rel(h_d, r_d) <= FP32


def _toy(mode: str, seed: int = 0) -> Tuple[ZMask, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"a": (32, 45, 60), "b": (64, 23, 30), "c": (16, 90, 120)}
    taps = {k: torch.randn(3, *s, generator=g).abs() for k, s in sizes.items()}
    taps["a"][1, :, 10:25, 15:40] += 6.0
    taps["c"][2, :, 20:50, 30:80] += 4.0
    spr = SPRConfig((53, 70), ((23, 30), (11, 15), (6, 8), (3, 4)), ((31, 31), (11, 15)), mode)
    cfg = ZMaskConfig(shallow=("a", "b", "c"), deep=("b", "c"), spr=spr, lambda0=0.05)
    stats = ChannelStats({k: torch.rand(s[0], generator=g).to(DEV) for k, s in sizes.items()},
                         {k: (torch.rand(s[0], generator=g) + 0.5).to(DEV) for k, s in sizes.items()})
    zm = ZMask(EngineTaps(lambda x: (x, {}), cfg.layers), cfg, stats, FusionBlock(w3=2.0, b3=-0.5)).to(DEV)
    return zm, {k: v.to(DEV) for k, v in taps.items()}


def _assert_detect_close(got, ref, tol: float, lambda0: float) -> None:
    for name in ("h_s", "h_d", "soft_mask", "score"):
        assert rel(getattr(got, name), getattr(ref, name)) <= tol, name
    assert got.mask.shape == ref.mask.shape and got.mask.dtype == ref.mask.dtype
    at_threshold = (ref.score.float() - lambda0).abs() <= tol * ref.score.float().abs().max()
    assert bool(((got.flagged == ref.flagged) | at_threshold).all())    # flags may differ only there
    same_flags = got.flagged == ref.flagged
    assert float((got.mask[same_flags] != ref.mask[same_flags]).float().mean()) <= 1e-3


@pytest.mark.parametrize("mode", ["same", "demo"])
def test_detect_parity(mode: str) -> None:
    zm, taps = _toy(mode)
    with torch.inference_mode():
        ref = zm.detect(taps, (360, 480))
        got = kernels.fused_detect(zm, taps, (360, 480))
    _assert_detect_close(got, ref, FP32, zm.cfg.lambda0)
    assert bool(ref.flagged.any()) and got.flagged.dtype == torch.bool


def test_fp16_taps() -> None:
    zm, taps = _toy("same", seed=2)
    half = {k: v.half() for k, v in taps.items()}
    with torch.inference_mode():
        got = kernels.fused_detect(zm, half, (360, 480))
        _assert_detect_close(got, zm.detect({k: v.float() for k, v in half.items()}, (360, 480)), FP16_UP,
                             zm.cfg.lambda0)
        ref16 = zm.detect(half, (360, 480))
    for name in ("h_s", "h_d", "soft_mask", "score"):
        assert rel(getattr(got, name), getattr(ref16, name)) <= FP16, name


def test_strided_taps_and_side_stream() -> None:
    zm, taps = _toy("same", seed=3)
    strided = {"a": taps["a"].to(memory_format=torch.channels_last), "b": taps["b"][:, :, :, :],
               "c": torch.cat([taps["c"], taps["c"]], 3)[..., :120]}
    with torch.inference_mode():
        ref = zm.detect(taps, (90, 120))
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            got = kernels.fused_detect(zm, strided, (90, 120))
        torch.cuda.current_stream().wait_stream(side)
    _assert_detect_close(got, ref, FP32, zm.cfg.lambda0)


def test_deterministic_heatmaps() -> None:
    zm, taps = _toy("same", seed=4)
    a = kernels.fused_heatmaps(zm.cfg, zm.stats, taps)
    b = kernels.fused_heatmaps(zm.cfg, zm.stats, taps)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs_raise() -> None:
    zm, taps = _toy("same")
    with pytest.raises(TypeError, match="float32 or float16"):
        kernels.fused_heatmaps(zm.cfg, zm.stats, {**taps, "b": taps["b"].bfloat16()})
    bad = taps["a"].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FusedZMask(zm.cfg, zm.stats, check_finite=True).heatmaps({**taps, "a": bad})
    with pytest.raises(ValueError, match="channels"):
        kernels.fused_heatmaps(zm.cfg, zm.stats, {**taps, "a": taps["a"][:, :5]})


def test_hook_auto_and_fused() -> None:
    zm, taps = _toy("same", seed=5)
    auto = ZMask(zm.taps, zm.cfg, zm.stats, zm.fusion, heatmap_backend=heatmap_backend("auto"))
    with torch.inference_mode():
        got = auto.detect(taps, (360, 480))
        ref = zm.detect(taps, (360, 480))
    assert list(auto._fused.verdicts.values()) == [True]
    _assert_detect_close(got, ref, FP32, zm.cfg.lambda0)
    fused = ZMask(zm.taps, zm.cfg, zm.stats, zm.fusion, heatmap_backend=heatmap_backend("fused"))
    with pytest.raises(RuntimeError, match="no backward"):
        fused.heatmaps({k: v.clone().requires_grad_(True) for k, v in taps.items()})


def _shipped_zmask():
    from realtime.defenses.artifact import load_calibration
    from realtime.models import build_model
    model = build_model("ddrnet23_slim", device=DEV)
    return load_calibration("calibration/shipped/ddrnet23_slim.safetensors", model).build_zmask(model)


def _check_real(zm: ZMask, x: torch.Tensor) -> None:
    with torch.inference_mode():
        _, taps = zm.taps(x)
        ref = zm.detect(taps, tuple(x.shape[-2:]))
        got = kernels.fused_detect(zm, taps, tuple(x.shape[-2:]))
        _assert_detect_close(got, ref, FP32, zm.cfg.lambda0)
        half = {k: v.half() for k, v in taps.items()}
        got16 = kernels.fused_detect(zm, half, tuple(x.shape[-2:]))
        ref16 = zm.detect({k: v.float() for k, v in half.items()}, tuple(x.shape[-2:]))
        _assert_detect_close(got16, ref16, FP16_UP, zm.cfg.lambda0)


def test_shipped_ddrnet_random_frame() -> None:
    zm = _shipped_zmask()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 360, 480, generator=g) * 0.3 + 0.3
    x[1, :, 100:220, 150:300] = torch.rand(3, 120, 150, generator=g)
    _check_real(zm, x.to(DEV))


def test_shipped_ddrnet_camvid_frame(camvid_root: Path) -> None:
    import numpy as np
    from PIL import Image
    frames = sorted((camvid_root / "val").glob("*.png"))[:2]
    if not frames:
        pytest.skip(f"no frames under {camvid_root / 'val'}")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((480, 360)))).permute(2, 0, 1)
                     for f in frames]).float() / 255.0
    _check_real(_shipped_zmask(), x.to(DEV))
