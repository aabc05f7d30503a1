"""Building TensorRT plans from our ONNX export, with on-disk plan and timing caches.

Written against TensorRT's documented Python API (``trt.Builder``, ``create_network``,
``trt.OnnxParser``, builder config flags, ``IInt8EntropyCalibrator2``, timing caches,
``build_serialized_network``). TensorRT itself is imported lazily and only here and in
``trt_engine``; everything that decides *what* to build and *where* it is cached is plain Python,
tested without TensorRT.

Precision: TensorRT 8-10 build "weakly typed" networks: an fp32 ONNX graph plus builder flags (FP16,
BF16, INT8 with an entropy calibrator fed by CamVid train frames). TensorRT 11 removed those flags;
the precision then comes from the graph itself (strongly typed): fp16 builds from our fp16 ONNX export,
and INT8 would need an explicitly quantised (Q/DQ) graph, which we do not produce.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .cache import atomic_write_bytes, safe_name
from .config import EngineConfig, EngineError, EngineUnavailable

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or EngineUnavailable('TensorRT is not installed: ...')."""
    try:
        import tensorrt as trt
    except Exception as exc:  # missing wheel, stub package or missing shared libraries
        raise EngineUnavailable(f"TensorRT is not installed: {type(exc).__name__}: {exc}") from None
    return trt


def tensorrt_available() -> Tuple[bool, str]:
    try:
        trt = import_tensorrt()
    except EngineUnavailable as exc:
        return False, str(exc)
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but needs a CUDA GPU (none visible)"
    return True, f"TensorRT {trt.__version__}"


def major_version(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise EngineError(f"cannot parse TensorRT version {version!r}") from None


def precision_plan(precision: str, trt_version: str, weak_flags: Sequence[str]) -> Tuple[str, List[str]]:
    """(ONNX precision to export, builder flags to set) for ``precision`` on this TensorRT.

    ``weak_flags``: names of the precision flags this TensorRT's ``BuilderFlag`` still has (FP16, BF16, INT8).
    """
    weak = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"]}[precision]
    if all(f in weak_flags for f in weak):
        return "fp32", weak
    if precision in ("fp32", "fp16"):
        return precision, []          # strongly typed: the graph's own types decide
    raise EngineError(f"TensorRT {trt_version} has no {precision} builder flag (weak typing was removed); "
                      f"{precision} needs an explicitly quantised/cast ONNX graph, which this exporter does not make")


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def plan_key_parts(fingerprint: str, gpu: str, trt_version: str, precision: str, cfg: EngineConfig,
                   onnx_key: str, layers: Sequence[str]) -> Dict[str, Any]:
    """Everything a serialized plan depends on: any change means a rebuild (a new cache name)."""
    return {"kind": "tensorrt-plan/1", "fingerprint": fingerprint, "gpu": gpu, "tensorrt": str(trt_version),
            "precision": precision, "input_shape": list(cfg.input_shape), "batch": [1, cfg.batch, cfg.max_batch],
            "layers": list(layers), "onnx": onnx_key, "workspace_gb": cfg.workspace_gb,
            "calib_frames": cfg.calib_frames if precision == "int8" else 0}


def plan_path(cfg: EngineConfig, model_name: str, key: str) -> Path:
    return cfg.cache_root() / "tensorrt" / f"{safe_name(model_name)}-{key}.plan"


def timing_cache_path(cfg: EngineConfig, gpu: str, trt_version: str) -> Path:
    return cfg.cache_root() / "tensorrt" / f"timing-{safe_name(gpu)}-trt{safe_name(str(trt_version))}.cache"


def make_calibrator(trt: Any, batches: Iterator[torch.Tensor], batch: int, device: torch.device,
                    cache_file: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` (CPU float) through one device buffer."""
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise EngineError(f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2 (implicit INT8 was removed)")

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)          # TensorRT requires the explicit base initialiser
            self._batches = batches
            self._buf = torch.empty(batch, 3, 1, 1, device=device)
            self.seen = 0

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            frames = next(self._batches, None)
            if frames is None:
                return None
            if frames.shape[0] < batch:   # pad a short last batch by repeating its frames
                reps = -(-batch // frames.shape[0])
                frames = frames.repeat(reps, 1, 1, 1)[:batch]
            self._buf = frames.to(device).contiguous()
            if self._buf.is_cuda:                 # TensorRT reads the buffer on its own stream
                torch.cuda.current_stream(device).synchronize()
            self.seen += int(frames.shape[0])
            return [int(self._buf.data_ptr())]

        def read_calibration_cache(self) -> Optional[bytes]:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            atomic_write_bytes(cache_file, bytes(cache))

    return EntropyCalibrator()


def build_plan(trt: Any, onnx_file: Path, cfg: EngineConfig, flags: Sequence[str], input_name: str,
               timing_file: Path, calibrator: Any = None) -> bytes:
    """Parse ``onnx_file``, configure (profile 1..max_batch, flags, timing cache) and build a serialized plan."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = 0
    if major_version(trt.__version__) < 10:      # explicit batch is the only mode from TensorRT 10 on
        explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_file.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_file}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    h, w = cfg.input_shape
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, 3, h, w), (cfg.batch, 3, h, w), (cfg.max_batch, 3, h, w))
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    timing = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_file} (see the TensorRT log above)")
    atomic_write_bytes(timing_file, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, tdt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return tdt
    raise EngineError(f"unsupported TensorRT tensor type {dt}")


def build_defended_plan(trt: Any, model: Any, cal: Any, cfg: EngineConfig, fingerprint: str, model_name: str,
                        flags: Sequence[str], timing_file: Path, head: str = "logits") -> Tuple[bytes, Any]:
    """A TensorRT plan of the whole defended graph (``defended_export``): the same ONNX file onnxruntime
    runs, through the same builder sequence as the backbone (``build_plan``). Returns (plan, graph file)."""
    from .defended_export import export_defended
    graph = export_defended(model, cal, cfg, fingerprint, model_name, head=head)
    return build_plan(trt, graph.path, cfg, flags, graph.input_name, timing_file), graph
