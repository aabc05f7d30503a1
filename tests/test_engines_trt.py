"""TensorRT backends: everything up to the build (precision plan, cache keys, calibration frames, the
INT8 calibrator, the builder calls) is tested without TensorRT; real builds run only where TensorRT
and a GPU are present (skipped here with the reason).

The builder test drives ``build_plan`` with a small stand-in for the ``tensorrt`` module that records
the calls: it checks our sequence of documented API calls (parse, flags, profile, timing cache,
build) and our error handling, not TensorRT itself.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List

import pytest
import torch

from engines import EngineConfig, EngineError, available_engines, build_engine
from engines.cache import cache_key
from engines.calib_data import calibration_batches, calibration_indices
from engines.trt_build import (build_plan, import_tensorrt, make_calibrator, plan_key_parts, plan_path,
                               precision_plan, timing_cache_path)
from realtime.defenses import ActivationTaps
from realtime.models import build_model

LAYERS = ("layer3", "layer4_", "layer2")
HW = (96, 128)


def test_missing_tensorrt_is_reported_plainly():
    try:
        import tensorrt  # noqa: F401
    except Exception:
        with pytest.raises(EngineError, match="^TensorRT is not installed: "):
            import_tensorrt()
        assert available_engines()["tensorrt"][1].startswith("TensorRT is not installed")
    else:
        assert import_tensorrt() is not None


def test_precision_plan_weak_and_strong_typing():
    weak = ["FP16", "BF16", "INT8"]
    assert precision_plan("fp32", "10.3.0", weak) == ("fp32", [])
    assert precision_plan("fp16", "10.3.0", weak) == ("fp32", ["FP16"])
    assert precision_plan("int8", "10.3.0", weak) == ("fp32", ["INT8", "FP16"])
    assert precision_plan("bf16", "10.3.0", weak) == ("fp32", ["BF16"])
    assert precision_plan("fp16", "11.1.0", []) == ("fp16", [])      # strongly typed: an fp16 graph
    with pytest.raises(EngineError, match="no int8 builder flag"):
        precision_plan("int8", "11.1.0", [])


def test_plan_cache_key_changes_with_every_part(tmp_path):
    cfg = EngineConfig(backend="tensorrt", input_shape=HW, cache_dir=str(tmp_path))
    base = plan_key_parts("fp", "NVIDIA H100", "10.3.0", "fp16", cfg, "onnxkey", LAYERS)
    variants = [plan_key_parts("fp2", "NVIDIA H100", "10.3.0", "fp16", cfg, "onnxkey", LAYERS),
                plan_key_parts("fp", "NVIDIA A100", "10.3.0", "fp16", cfg, "onnxkey", LAYERS),
                plan_key_parts("fp", "NVIDIA H100", "10.4.0", "fp16", cfg, "onnxkey", LAYERS),
                plan_key_parts("fp", "NVIDIA H100", "10.3.0", "int8", cfg, "onnxkey", LAYERS),
                plan_key_parts("fp", "NVIDIA H100", "10.3.0", "fp16", dataclasses.replace(cfg, input_shape=(64, 64)),
                               "onnxkey", LAYERS),
                plan_key_parts("fp", "NVIDIA H100", "10.3.0", "fp16", dataclasses.replace(cfg, max_batch=4),
                               "onnxkey", LAYERS),
                plan_key_parts("fp", "NVIDIA H100", "10.3.0", "fp16", cfg, "onnxkey", LAYERS[:1])]
    keys = {cache_key(base)} | {cache_key(v) for v in variants}
    assert len(keys) == 1 + len(variants)
    p = plan_path(cfg, "ddrnet23_slim", cache_key(base))
    assert p.parent == tmp_path / "tensorrt" and p.name.startswith("ddrnet23_slim-") and p.suffix == ".plan"
    assert timing_cache_path(cfg, "NVIDIA H100 80GB HBM3", "10.3.0").name == "timing-NVIDIA_H100_80GB_HBM3-trt10.3.0.cache"


def test_calibration_frames(tiny_camvid: Path):
    idx = calibration_indices(100, 5)
    assert idx.tolist() == [0, 25, 50, 74, 99]
    assert calibration_indices(3, 10).tolist() == [0, 1, 2]
    batches = list(calibration_batches((8, 10), count=3, batch=2, root=str(tiny_camvid)))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 10), (1, 3, 8, 10)]
    assert all(b.dtype == torch.float32 and 0 <= b.min() and b.max() <= 1 for b in batches)
    with pytest.raises(EngineError, match="INT8 calibration needs CamVid frames"):
        next(calibration_batches((8, 10), 3, 2, root=str(tiny_camvid / "missing")))


class _Base:
    """Stands in for ``trt.IInt8EntropyCalibrator2`` (a pybind class whose __init__ must be called)."""

    def __init__(self) -> None:
        self.base_initialised = True


def test_int8_calibrator_feeds_padded_batches_and_caches(tmp_path):
    fake = SimpleNamespace(__version__="10.3.0", IInt8EntropyCalibrator2=_Base)
    frames = iter([torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4)])
    cal = make_calibrator(fake, frames, 2, torch.device("cpu"), tmp_path / "m.calib")
    assert cal.base_initialised and cal.get_batch_size() == 2
    p1 = cal.get_batch(["input"])
    assert len(p1) == 1 and p1[0] == cal._buf.data_ptr()
    cal.get_batch(["input"])
    assert cal._buf.shape[0] == 2 and torch.equal(cal._buf[0], cal._buf[1])     # short batch padded
    assert cal.get_batch(["input"]) is None and cal.seen == 4
    assert cal.read_calibration_cache() is None
    cal.write_calibration_cache(memoryview(b"scales"))
    assert cal.read_calibration_cache() == b"scales"
    with pytest.raises(EngineError, match="no IInt8EntropyCalibrator2"):
        make_calibrator(SimpleNamespace(__version__="11.0"), frames, 2, torch.device("cpu"), tmp_path / "x")


class _Recorder:
    """Minimal stand-in for the tensorrt module: records builder calls, returns a fixed plan."""

    def __init__(self, parse_ok: bool = True, plan: Any = b"PLAN") -> None:
        self.calls: List[Any] = []
        rec = self
        self.__version__ = "10.3.0"
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, lvl: None})
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = SimpleNamespace(FP16="fp16", INT8="int8", BF16="bf16")
        self.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)

        class Timing:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+timings"

        class Config:
            int8_calibrator = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                rec.calls.append(("pool", pool, size))

            def set_flag(self, flag: str) -> None:
                rec.calls.append(("flag", flag))

            def add_optimization_profile(self, prof: Any) -> None:
                rec.calls.append(("profile", prof.shapes))

            def set_calibration_profile(self, prof: Any) -> None:
                rec.calls.append(("calibration_profile",))

            def create_timing_cache(self, data: bytes) -> Timing:
                return Timing(data)

            def set_timing_cache(self, cache: Timing, ignore_mismatch: bool) -> None:
                self.timing = cache

            def get_timing_cache(self) -> Timing:
                return self.timing

        class Profile:
            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                self.shapes = (name, lo, opt, hi)

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network: Any, logger: Any) -> None:
                pass

            def parse(self, data: bytes) -> bool:
                rec.calls.append(("parse", len(data)))
                return parse_ok

            def get_error(self, i: int) -> str:
                return "Unsupported op Foo"

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> str:
                rec.calls.append(("network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Any, config: Config) -> Any:
                rec.calls.append(("build", config.int8_calibrator is not None))
                return plan

        self.Builder, self.OnnxParser = Builder, Parser


def test_build_plan_configures_the_builder(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x" * 10)
    timing = tmp_path / "timing.cache"
    cfg = EngineConfig(backend="tensorrt", input_shape=HW, batch=2, max_batch=4, workspace_gb=0.5)
    trt = _Recorder()
    assert build_plan(trt, onnx_file, cfg, ["INT8", "FP16"], "input", timing, calibrator=object()) == b"PLAN"
    assert ("parse", 10) in trt.calls and ("network", 0) in trt.calls
    assert ("pool", "workspace", 1 << 29) in trt.calls
    assert ("flag", "int8") in trt.calls and ("flag", "fp16") in trt.calls
    assert ("profile", ("input", (1, 3, *HW), (2, 3, *HW), (4, 3, *HW))) in trt.calls
    assert ("calibration_profile",) in trt.calls and trt.calls[-1] == ("build", True)
    assert timing.read_bytes() == b"+timings"
    build_plan(trt, onnx_file, cfg, [], "input", timing)                       # the timing cache is reused
    assert timing.read_bytes() == b"+timings+timings"
    with pytest.raises(EngineError, match="could not parse .*Unsupported op Foo"):
        build_plan(_Recorder(parse_ok=False), onnx_file, cfg, [], "input", timing)
    with pytest.raises(EngineError, match="failed to build"):
        build_plan(_Recorder(plan=None), onnx_file, cfg, [], "input", timing)


def test_defended_graph_goes_through_the_same_builder(tmp_path):
    from engines.trt_build import build_defended_plan
    from realtime.defenses.artifact import load_calibration
    from realtime.models import fingerprint
    model = build_model("ddrnet23_slim")
    cal = load_calibration(Path(__file__).resolve().parents[1] / "calibration/shipped/ddrnet23_slim.safetensors", model)
    cfg = EngineConfig(backend="tensorrt", input_shape=(64, 96), max_batch=4, cache_dir=str(tmp_path))
    trt = _Recorder()
    plan, graph = build_defended_plan(trt, model, cal, cfg, fingerprint(model), "ddrnet23_slim", ["FP16"],
                                      tmp_path / "timing.cache")
    assert plan == b"PLAN" and ("parse", graph.path.stat().st_size) in trt.calls
    assert ("profile", ("input", (1, 3, 64, 96), (1, 3, 64, 96), (4, 3, 64, 96))) in trt.calls
    assert graph.outputs[0] == "logits" and "score" in graph.outputs and "keep_mask" in graph.outputs


needs_trt = pytest.mark.skipif(not available_engines()["tensorrt"][0],
                               reason=f"real TensorRT builds: {available_engines()['tensorrt'][1]}")
needs_ttrt = pytest.mark.skipif(not available_engines()["torch_tensorrt"][0],
                                reason=f"torch-tensorrt: {available_engines()['torch_tensorrt'][1]}")


def _check_parity(eng: Any, model: torch.nn.Module, rel: float) -> None:
    x = torch.rand(2, 3, *HW, device="cuda")
    with torch.no_grad(), ActivationTaps(model, LAYERS) as taps:
        want, want_taps = taps(x)
    got, got_taps = eng(x)
    for g, w in [(got, want), *[(got_taps[k], want_taps[k]) for k in LAYERS]]:
        assert (g - w).abs().max() <= rel * w.abs().max()


@needs_trt
@pytest.mark.parametrize("precision,rel", [("fp32", 1e-3), ("fp16", 0.02)])
def test_tensorrt_parity_and_plan_cache(tmp_path, precision, rel):
    model = build_model("ddrnet23_slim", device="cuda")
    cfg = EngineConfig(backend="tensorrt", device="cuda", precision=precision, input_shape=HW,
                       cache_dir=str(tmp_path))
    eng = build_engine(model, LAYERS, cfg)
    assert eng.describe()["plan_cache_hit"] is False
    _check_parity(eng, model, rel)
    assert build_engine(model, LAYERS, cfg).describe()["plan_cache_hit"] is True


@needs_ttrt
def test_torch_tensorrt_parity():
    model = build_model("ddrnet23_slim", device="cuda")
    eng = build_engine(model, LAYERS, EngineConfig(backend="torch_tensorrt", device="cuda", input_shape=HW))
    _check_parity(eng, model, 1e-3)
