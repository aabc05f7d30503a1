"""Engine interface: registry, config, the tapped module, the eager torch backend, Z-Mask on an engine.

Tolerances (engine vs the hook-based ``ActivationTaps`` on the same model, DDRNet-23-slim 96x128):
fp32 torch: exact (same kernels); channels_last: atol 1e-4 + rtol 1e-4 (measured <= 8e-6); bf16 CPU
autocast: max |diff| <= 5% of the reference's max |value| and >= 97% of pixels keep their argmax class
(measured <= 1.4% / >= 99.6% on DDRNet-23-slim and BiSeNetV1).
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from engines import (PRECISIONS, Engine, EngineConfig, EngineError, EngineUnavailable, available_engines,
                     build_engine, engine_class, list_engines)
from engines.tapped import TapModule, needs_clone, onnx_names
from realtime.defenses import ActivationTaps, ChannelStats, FusionBlock, SPRConfig, ZMask, ZMaskConfig
from realtime.models import build_model, fingerprint

LAYERS = ("layer3", "layer4_", "layer2")
HW = (96, 128)


class Tiny(nn.Module):
    """Small segmenter; ``act`` modifies ``conv``'s output in place (a tap that needs copying)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("mean_color", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.act(self.conv(x - self.mean_color)))
        return nn.functional.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def ddrnet() -> nn.Module:
    return build_model("ddrnet23_slim")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, *HW, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(ddrnet, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    with torch.no_grad(), ActivationTaps(ddrnet, LAYERS) as taps:
        return taps(batch)


def test_registry_lists_every_backend_and_reports_availability():
    names = list_engines()
    assert names[:3] == ["torch", "compile", "onnxruntime"] and {"tensorrt", "torch_tensorrt"} <= set(names)
    avail = available_engines()
    assert set(avail) == set(names)
    assert all(isinstance(ok, bool) and isinstance(why, str) and why for ok, why in avail.values())
    assert avail["torch"][0] is True
    with pytest.raises(KeyError, match="unknown engine 'nope'.*torch"):
        engine_class("nope")


def test_unavailable_backend_is_one_clear_error(ddrnet):
    ok, why = available_engines()["tensorrt"]
    if ok:
        pytest.skip("TensorRT is installed here")
    assert why.startswith("TensorRT is not installed") or "needs a CUDA GPU" in why
    with pytest.raises(EngineUnavailable, match="engine 'tensorrt' is not available: TensorRT"):
        build_engine(ddrnet, LAYERS, EngineConfig(backend="tensorrt", input_shape=HW))


def test_config_validation_and_cache_location(monkeypatch, tmp_path):
    assert PRECISIONS == ("fp32", "fp16", "bf16", "int8")
    with pytest.raises(ValueError, match="precision"):
        EngineConfig(precision="fp8")
    with pytest.raises(ValueError, match="input_shape"):
        EngineConfig(input_shape=(4, 4))
    with pytest.raises(ValueError, match="batch"):
        EngineConfig(batch=4, max_batch=2)
    monkeypatch.delenv("REALTIME_ENGINE_CACHE", raising=False)
    assert str(EngineConfig().cache_root()).endswith(".cache/zmask-realtime/engines")
    monkeypatch.setenv("REALTIME_ENGINE_CACHE", str(tmp_path / "env"))
    assert EngineConfig().cache_root() == tmp_path / "env"
    assert EngineConfig(cache_dir=str(tmp_path / "cfg")).cache_root() == tmp_path / "cfg"


def test_tap_module_matches_hooks_and_leaves_the_model_alone(ddrnet, batch, reference):
    before = fingerprint(ddrnet)
    tm = TapModule(ddrnet, LAYERS)
    with torch.no_grad():
        out, *taps = tm(batch)
    ref_out, ref_taps = reference
    assert torch.equal(out, ref_out)
    for name, t in zip(LAYERS, taps):
        assert torch.equal(t, ref_taps[name]), name
    assert fingerprint(ddrnet) == before and dict(ddrnet.named_modules()).keys() >= set(LAYERS)
    assert not any(type(m).__name__ == "_Recorder" for m in ddrnet.modules())
    with pytest.raises(KeyError, match="nope"):
        TapModule(ddrnet, ["nope"])
    with pytest.raises(ValueError, match="inside"):
        TapModule(ddrnet, ["layer3", "layer3.0"])


def test_tap_modified_in_place_downstream_is_copied():
    m = Tiny().eval()
    assert needs_clone(m, ["conv"], (16, 16)) and not needs_clone(m, ["body"], (16, 16))
    x = torch.randn(1, 3, 16, 16)
    tm = TapModule(m, ["conv", "body"])
    assert tm.clone
    with torch.no_grad():
        _, conv_map, _ = tm(x)
        expect = m.conv(x - m.mean_color)
    assert torch.allclose(conv_map, expect) and (conv_map < 0).any()     # not the ReLU'd tensor


def test_onnx_names_are_unique_and_portable():
    names = onnx_names(["context_path.backbone.layer2", "context_path_backbone_layer2", "layer3"])
    assert list(names.values()) == ["tap_context_path_backbone_layer2", "tap_context_path_backbone_layer2_2",
                                    "tap_layer3"]


def test_torch_engine_fp32_is_exact_and_describes_itself(ddrnet, batch, reference):
    eng = build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW))
    assert isinstance(eng, Engine) and eng.name == "torch" and eng.layers == LAYERS
    out, taps = eng(batch)
    ref_out, ref_taps = reference
    assert torch.equal(out, ref_out) and list(taps) == list(LAYERS)
    assert all(torch.equal(taps[k], ref_taps[k]) for k in LAYERS)
    assert torch.equal(eng.plain(batch), ref_out)
    assert torch.equal(eng.mean_color, ddrnet.mean_color)
    d = eng.describe()
    assert d["engine"] == "torch" and d["precision"] == "fp32" and d["fingerprint"] == fingerprint(ddrnet)
    assert eng.device == torch.device("cpu") and eng.precision == "fp32"


def test_torch_engine_channels_last_and_bf16(ddrnet, batch, reference):
    ref_out, ref_taps = reference
    cl = build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW, channels_last=True))
    out, taps = cl(batch)
    assert torch.allclose(out, ref_out, atol=1e-4, rtol=1e-4)
    assert all(torch.allclose(taps[k], ref_taps[k], atol=1e-4, rtol=1e-4) for k in LAYERS)
    bf = build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW, precision="bf16"))
    out, taps = bf(batch)
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in taps.values())
    for name, got, want in [("logits", out, ref_out), *[(k, taps[k], ref_taps[k]) for k in LAYERS]]:
        assert (got - want).abs().max() <= 0.05 * want.abs().max(), name
    assert (out.argmax(1) == ref_out.argmax(1)).float().mean() >= 0.97


def test_cpu_only_limits_are_clear_errors(ddrnet):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device"):
        build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW, cuda_graph=True))
    with pytest.raises(EngineError, match="fp16 autocast needs a CUDA device"):
        build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW, precision="fp16"))
    with pytest.raises(EngineError, match="supports precision fp32, fp16, bf16, not int8"):
        build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW, precision="int8"))
    with pytest.raises(EngineError, match="no CUDA GPU"):
        build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW, device="cuda"))


def test_bad_inputs_give_clear_errors(ddrnet):
    eng = build_engine(ddrnet, LAYERS, EngineConfig(input_shape=HW))
    with pytest.raises(ValueError, match=r"\(N,3,H,W\), got shape \(1, 4, 96, 128\)"):
        eng(torch.rand(1, 4, *HW))
    with pytest.raises(ValueError, match=r"floating image in \[0,1\], got dtype torch.uint8"):
        eng(torch.zeros(1, 3, *HW, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expects a torch.Tensor, got ndarray"):
        eng(torch.rand(1, 3, *HW).numpy())
    with pytest.raises(ValueError, match="got shape \\(3, 96, 128\\)"):
        eng.plain(torch.rand(3, *HW))
    with pytest.raises(TypeError, match="single string"):
        build_engine(ddrnet, "layer3")
    with pytest.raises(KeyError, match="not modules"):
        build_engine(ddrnet, ["layer9"])


def test_build_by_name_and_without_layers():
    eng = build_engine("ddrnet23_slim", (), EngineConfig(input_shape=(64, 64)))
    out, taps = eng(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 11, 64, 64) and taps == {}


def test_zmask_runs_on_an_engine_like_on_the_model():
    m = Tiny().eval()
    spr = SPRConfig(work_size=(8, 8), kernels_shallow=((3, 3), (2, 2)), kernels_deep=((3, 3),))
    cfg = ZMaskConfig(shallow=("conv", "body"), deep=("body",), spr=spr, lambda0=0.1)
    stats = ChannelStats({k: torch.rand(8) for k in ("conv", "body")}, {k: torch.rand(8) + 0.5 for k in ("conv", "body")})
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ZMask(ActivationTaps(m, cfg.layers, clone=True), cfg, stats, FusionBlock()).eval()(x)
        eng = build_engine(m, cfg.layers, EngineConfig(input_shape=(32, 32)))
        got = ZMask(eng, cfg, stats, FusionBlock()).eval()(x)
    assert torch.equal(got.score, want.score) and torch.equal(got.flagged, want.flagged)
    assert torch.equal(got.defended_output, want.defended_output)
    assert torch.equal(got.mask, want.mask)
