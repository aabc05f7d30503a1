"""onnxruntime backend: parity with eager torch, dynamic batch, the ONNX cache, Z-Mask on the engine.

Tolerances vs eager torch (logits and every tap): fp32 atol 1e-4 + rtol 1e-4 (measured max |diff|
<= 1.2e-5 on DDRNet-23-slim and BiSeNetV1 at 96x128 and 360x480); fp16 graph max |diff| <= 1% of the
reference's max |value| and >= 99% of pixels keep their argmax class (measured <= 0.19% / >= 99.89%).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Tuple

import onnx
import pytest
import torch

from engines import EngineConfig, EngineError, build_engine
from engines.cache import atomic_path, cache_key
from engines.onnx_export import export_onnx, onnx_key_parts, read_metadata
from engines.ort_engine import choose_providers
from realtime.defenses import ActivationTaps, FusionBlock, ZMask
from realtime.models import build_model, fingerprint

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("layer3", "layer4_", "layer2")
HW = (96, 128)


@pytest.fixture(scope="module")
def ddrnet():
    return build_model("ddrnet23_slim")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def cfg(cache) -> EngineConfig:
    return EngineConfig(backend="onnxruntime", input_shape=HW, cache_dir=str(cache), threads=1)


@pytest.fixture(scope="module")
def ort_fp32(ddrnet, cfg):
    return build_engine(ddrnet, LAYERS, cfg)


def _reference(model, x) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    with torch.no_grad(), ActivationTaps(model, LAYERS) as taps:
        return taps(x)


def test_fp32_parity_and_dynamic_batch(ddrnet, ort_fp32):
    assert ort_fp32.name == "onnxruntime" and ort_fp32.describe()["providers"][-1] == "CPUExecutionProvider"
    for n in (1, 2, 3):                                   # exported at batch 1
        x = torch.rand(n, 3, *HW, generator=torch.Generator().manual_seed(n))
        want, want_taps = _reference(ddrnet, x)
        got, taps = ort_fp32(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert list(taps) == list(LAYERS)
        for k in LAYERS:
            torch.testing.assert_close(taps[k], want_taps[k], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ort_fp32.plain(x), want, atol=1e-4, rtol=1e-4)


def test_fp32_parity_bisenet_with_dotted_layer_names(cfg):
    model = build_model("bisenetv1")
    layers = ("context_path.backbone.layer2", "context_path.backbone.layer3", "context_path.backbone.layer1")
    eng = build_engine(model, layers, cfg)
    assert eng.describe()["tap_names"]["context_path.backbone.layer2"] == "tap_context_path_backbone_layer2"
    x = torch.rand(2, 3, *HW, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), ActivationTaps(model, layers) as ref:
        want, want_taps = ref(x)
    got, taps = eng(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for k in layers:
        torch.testing.assert_close(taps[k], want_taps[k], atol=1e-4, rtol=1e-4)


def test_fp16_graph_parity(ddrnet, cfg):
    eng = build_engine(ddrnet, LAYERS, dataclasses.replace(cfg, precision="fp16"))
    x = torch.rand(2, 3, *HW, generator=torch.Generator().manual_seed(7))
    want, want_taps = _reference(ddrnet, x)
    got, taps = eng(x)
    assert got.dtype == torch.float32
    for name, g, w in [("logits", got, want), *[(k, taps[k], want_taps[k]) for k in LAYERS]]:
        assert (g - w).abs().max() <= 0.01 * w.abs().max(), name
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99


def test_onnx_file_has_named_tap_outputs_and_metadata(ort_fp32, ddrnet):
    path = Path(ort_fp32.describe()["onnx"])
    proto = onnx.load(str(path))
    outs = [o.name for o in proto.graph.output]
    assert outs == ["logits", "tap_layer3", "tap_layer4_", "tap_layer2"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = read_metadata(path)
    assert meta["zmask.fingerprint"] == fingerprint(ddrnet) and meta["zmask.model"] == "ddrnet23_slim"
    assert meta["zmask.tap_names"] == '{"layer3": "tap_layer3", "layer4_": "tap_layer4_", "layer2": "tap_layer2"}'


class Small(torch.nn.Module):
    """A two-conv segmenter: the cache logic does not need a real model (exports in ~1 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.head(self.stem(x)), size=x.shape[-2:], mode="nearest")


def test_cache_hit_miss_and_rebuild(tmp_path):
    cfg = EngineConfig(backend="onnxruntime", input_shape=(16, 16), cache_dir=str(tmp_path))
    model = Small().eval()
    fp = fingerprint(model)
    first = export_onnx(model, ["stem"], cfg, fp, "small")
    assert not first.hit and first.path.parent == tmp_path / "onnx" and first.path.name.startswith("small-")
    hit = export_onnx(model, ["stem"], cfg, fp, "small")
    assert hit.hit and hit.path == first.path
    forced = export_onnx(model, ["stem"], dataclasses.replace(cfg, rebuild=True), fp, "small")
    assert not forced.hit and forced.path == first.path
    assert export_onnx(model, ["head"], cfg, fp, "small").path != first.path
    assert export_onnx(model, ["stem"], dataclasses.replace(cfg, input_shape=(16, 32)), fp, "small").path != first.path
    # a changed model (one weight nudged) has another fingerprint, hence another file, and its own outputs
    changed = Small().eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.head.bias[0] += 1.0
    eng = build_engine(changed, ["stem"], cfg)
    assert eng.describe()["onnx_cache_hit"] is False and Path(eng.describe()["onnx"]) != first.path
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(eng.plain(x), changed(x), atol=1e-5, rtol=1e-5)
    assert build_engine(changed, ["stem"], cfg).describe()["onnx_cache_hit"] is True
    # a file under the right name but with foreign content is exported again, not trusted
    first.path.write_bytes(b"not an onnx file")
    again = export_onnx(model, ["stem"], cfg, fp, "small")
    assert not again.hit and read_metadata(first.path)["zmask.key"] == again.key
    assert sorted(p.suffix for p in (tmp_path / "onnx").iterdir()) == [".onnx"] * 4     # no temporary leftovers


def test_cache_keys_depend_on_every_part():
    base = onnx_key_parts("abc", ["a", "b"], (96, 128), 17, "fp32")
    keys = {cache_key(base)}
    for change in ({"fingerprint": "abd"}, {"layers": ["b", "a"]}, {"input_shape": [96, 130]}, {"opset": 18},
                   {"precision": "fp16"}):
        keys.add(cache_key({**base, **change}))
    assert len(keys) == 6 and cache_key(dict(base)) == cache_key(base)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.onnx"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("exporter died")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["x.onnx"]


def test_provider_choice():
    cpu = EngineConfig(backend="onnxruntime")
    assert choose_providers(cpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    gpu = dataclasses.replace(cpu, device="cuda")
    assert choose_providers(gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    with pytest.raises(EngineError, match="no CUDA provider"):
        choose_providers(gpu, ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="not in this build"):
        choose_providers(dataclasses.replace(cpu, providers=("FooExecutionProvider",)), ["CPUExecutionProvider"])


def test_static_shape_and_bad_inputs(ort_fp32):
    with pytest.raises(ValueError, match="built for 96x128 inputs, got 64x64"):
        ort_fp32(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="batches up to 8"):
        ort_fp32(torch.rand(9, 3, *HW))
    with pytest.raises(ValueError, match="got shape \\(1, 1, 96, 128\\)"):
        ort_fp32(torch.rand(1, 1, *HW))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        ort_fp32(torch.zeros(1, 3, *HW, dtype=torch.long))
    got = ort_fp32(torch.rand(1, 3, *HW, dtype=torch.float64))[0]     # other float dtypes are converted
    assert got.dtype == torch.float32
    with pytest.raises(EngineError, match="supports precision fp32, fp16, not bf16"):
        build_engine(build_model("ddrnet23_slim"), LAYERS, EngineConfig(backend="onnxruntime", precision="bf16"))


def _zmask_frames(hw: Tuple[int, int]) -> Tuple[torch.Tensor, bool]:
    """(clean frame, same frame with the library patch pasted) and whether the frame is real CamVid."""
    from realtime.attacks.apply import Placement, apply_patch, load_patch_png
    from realtime.data import CamVid
    try:
        clean, real = CamVid(None, "val")[10][0][None], True
    except Exception:  # no CamVid here: a smooth synthetic street-like frame
        yy, xx = torch.meshgrid(torch.linspace(0, 1, hw[0]), torch.linspace(0, 1, hw[1]), indexing="ij")
        clean, real = torch.stack([0.3 + 0.4 * yy, 0.4 + 0.2 * xx, 0.5 - 0.3 * yy])[None], False
    patch, _ = load_patch_png(REPO / "realtime" / "attacks" / "library" / "ddrnet23_slim_eot_L.png")
    patched, _ = apply_patch(clean, patch, Placement("fixed", (100, 170)))
    return torch.cat([clean, patched]), real


def test_zmask_on_onnxruntime_matches_eager_on_the_shipped_calibration(cache):
    from realtime.defenses.artifact import load_calibration
    model = build_model("ddrnet23_slim")
    cal = load_calibration(REPO / "calibration" / "shipped" / "ddrnet23_slim.safetensors", model)
    hw = tuple(cal.input_size)
    x, real = _zmask_frames(hw)
    eng = build_engine(model, cal.config.layers,
                       EngineConfig(backend="onnxruntime", input_shape=hw, cache_dir=str(cache), threads=1))
    with torch.no_grad():
        want = cal.build_zmask(model).eval()(x)
        got = ZMask(eng, cal.config, cal.stats, FusionBlock.from_dict(cal.fusion)).eval()(x)
    assert torch.equal(got.flagged, want.flagged)
    torch.testing.assert_close(got.score, want.score, atol=1e-4, rtol=1e-4)
    assert (got.mask != want.mask).float().mean() < 1e-3
    torch.testing.assert_close(got.defended_output, want.defended_output, atol=1e-3, rtol=1e-3)
    if real:                                  # on the real frame the patch is caught, the clean frame is not
        assert want.flagged.tolist() == [False, True]
