"""``tensorrt`` backend: a TensorRT plan built from our ONNX export, run on torch's CUDA stream.

The plan is cached under ``<cache>/tensorrt/`` keyed by model fingerprint, GPU name, TensorRT version,
precision, input shape, batch profile and layers (``trt_build.plan_key_parts``); any change gives a
new key, so a stale plan is never loaded. A cached plan that no longer deserialises (driver or
library change under the same version string) is rebuilt once. Inference binds torch tensors
(``set_input_shape`` / ``set_tensor_address``) and enqueues with ``execute_async_v3`` on torch's
current stream: no host synchronisation, no copies.
"""
from __future__ import annotations

import json
import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import Engine
from .cache import atomic_write_bytes, cache_key
from .calib_data import calibration_batches
from .config import EngineConfig, EngineError, check_device
from .onnx_export import INPUT_NAME, export_onnx
from .registry import register_engine
from .trt_build import (build_plan, gpu_name, import_tensorrt, make_calibrator, plan_key_parts, plan_path,
                        precision_plan, tensorrt_available, timing_cache_path, torch_dtype)

log = logging.getLogger(__name__)


@register_engine
class TensorRTEngine(Engine):
    """TensorRT via its Python API (ONNX parser, builder, runtime)."""

    name = "tensorrt"
    precisions = ("fp32", "fp16", "bf16", "int8")
    static_shape = True

    @classmethod
    def available(cls) -> Tuple[bool, str]:
        return tensorrt_available()

    def __init__(self, model: nn.Module, layers: Sequence[str], cfg: EngineConfig, fingerprint: str,
                 model_name: str, mean_color: Optional[torch.Tensor]) -> None:
        super().__init__(cfg, layers, mean_color, fingerprint, model_name)
        trt = import_tensorrt()
        self._trt = trt
        check_device(self.device, self.name)
        if self.device.type != "cuda":
            raise EngineError(f"TensorRT needs a CUDA device, got {self.device}")
        weak = [f for f in ("FP16", "BF16", "INT8") if hasattr(trt.BuilderFlag, f)]
        onnx_precision, flags = precision_plan(cfg.precision, trt.__version__, weak)
        art = export_onnx(model, self.layers, cfg, fingerprint, model_name, precision=onnx_precision)
        gpu = gpu_name(self.device)
        parts = plan_key_parts(fingerprint, gpu, trt.__version__, cfg.precision, cfg, art.key, self.layers)
        key = cache_key(parts)
        path = plan_path(cfg, model_name, key)
        with torch.cuda.device(self.device):
            hit = path.is_file() and not cfg.rebuild
            data = path.read_bytes() if hit else self._build(art.path, flags, path, parts, gpu)
            engine = self._deserialize(data)
            if engine is None and hit:
                log.warning("cached TensorRT plan %s does not load; rebuilding", path)
                hit = False
                engine = self._deserialize(self._build(art.path, flags, path, parts, gpu))
            if engine is None:
                raise EngineError(f"TensorRT could not deserialize the plan it built ({path})")
            self.engine = engine
            self.context = engine.create_execution_context()
        self._outputs = list(art.output_names)
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = [n for n in [INPUT_NAME, *self._outputs] if n not in io]
        if missing:
            raise EngineError(f"TensorRT plan {path} lacks tensors {missing} (has {io})")
        self._in_dtype = torch_dtype(trt, engine.get_tensor_dtype(INPUT_NAME))
        self._out_dtypes = [torch_dtype(trt, engine.get_tensor_dtype(n)) for n in self._outputs]
        self.info = {"tensorrt": trt.__version__, "gpu": gpu, "plan": str(path), "plan_cache_hit": hit,
                     "builder_flags": flags, "onnx": str(art.path), "onnx_precision": onnx_precision}

    def _deserialize(self, data: bytes) -> Any:
        runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.WARNING))
        self._runtime = runtime            # the runtime must outlive the engines it made
        try:
            return runtime.deserialize_cuda_engine(data)
        except Exception as exc:  # older bindings raise instead of returning None
            log.warning("TensorRT deserialize failed: %s", exc)
            return None

    def _build(self, onnx_file: Any, flags: List[str], path: Any, parts: dict, gpu: str) -> bytes:
        trt, cfg = self._trt, self.cfg
        calibrator = None
        if "INT8" in flags:
            batches = calibration_batches(cfg.input_shape, cfg.calib_frames, cfg.batch, cfg.calib_data)
            calibrator = make_calibrator(trt, batches, cfg.batch, self.device, path.with_suffix(".calib"))
        log.info("building TensorRT plan %s (this takes a while; it is cached)", path)
        data = build_plan(trt, onnx_file, cfg, flags, INPUT_NAME, timing_cache_path(cfg, gpu, trt.__version__),
                          calibrator)
        atomic_write_bytes(path, data)
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(parts, indent=2) + "\n").encode())
        return data

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = x.to(self._in_dtype).contiguous()
        ctx = self.context
        if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise EngineError(f"TensorRT rejected input shape {tuple(x.shape)}")
        ctx.set_tensor_address(INPUT_NAME, int(x.data_ptr()))
        outs = [torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=dt, device=self.device)
                for n, dt in zip(self._outputs, self._out_dtypes)]
        for n, t in zip(self._outputs, outs):
            ctx.set_tensor_address(n, int(t.data_ptr()))
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT execution failed (execute_async_v3 returned False)")
        return outs

