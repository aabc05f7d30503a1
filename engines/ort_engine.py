"""onnxruntime backend: the cached ONNX export run in an InferenceSession.

Providers are picked from what the installed build offers (``onnxruntime.get_available_providers()``):
on a CUDA device CUDA (and TensorRT, when its libraries are importable) before CPU; on CPU the CPU
provider. ``cfg.providers`` overrides the choice. On CUDA the session reads and writes torch's
tensors directly (IO binding, no host copies); elsewhere inputs and outputs go through numpy.
"""
from __future__ import annotations

import importlib.util
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .base import Engine
from .config import EngineConfig, EngineError, check_device
from .onnx_export import OnnxArtifact, export_onnx
from .registry import register_engine
from .threads import session_options

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def choose_providers(cfg: EngineConfig, available: Sequence[str]) -> List[str]:
    """Providers for a session on ``cfg.device`` among ``available`` (best first), or an EngineError."""
    if cfg.providers:
        missing = [p for p in cfg.providers if p not in available]
        if missing:
            raise EngineError(f"onnxruntime providers {missing} are not in this build (it has {list(available)})")
        return list(cfg.providers)
    if cfg.torch_device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EngineError(f"this onnxruntime build has no CUDA provider (it has {list(available)}); "
                              "install onnxruntime-gpu or use device cpu")
        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "TensorrtExecutionProvider" in available and importlib.util.find_spec("tensorrt") is not None:
            chosen.insert(0, "TensorrtExecutionProvider")
        return chosen
    return ["CPUExecutionProvider"]


@register_engine
class OrtEngine(Engine):
    """``onnxruntime``: ONNX export + InferenceSession; fp32 everywhere, fp16 (an fp16 graph) too."""

    name = "onnxruntime"
    precisions = ("fp32", "fp16")
    static_shape = True

    @classmethod
    def available(cls) -> Tuple[bool, str]:
        try:
            import onnxruntime as ort
            import onnx  # noqa: F401
        except Exception as exc:
            return False, f"onnxruntime is not installed: {exc}"
        return True, f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}"

    def __init__(self, model: nn.Module, layers: Sequence[str], cfg: EngineConfig, fingerprint: str,
                 model_name: str, mean_color: Optional[torch.Tensor]) -> None:
        super().__init__(cfg, layers, mean_color, fingerprint, model_name)
        import onnxruntime as ort
        check_device(self.device, "onnxruntime")
        self.artifact: OnnxArtifact = export_onnx(model, self.layers, cfg, fingerprint, model_name)
        self._model = model             # for ``defended``: the same model as one defended graph
        # One pool size for torch and ORT, idle ORT workers sleep (engines.threads): spinning workers
        # made Z-Mask's torch heatmaps ~3x slower on 2 cores.
        opts = session_options(ort, cfg.threads, self.device.type)
        providers = choose_providers(cfg, ort.get_available_providers())
        options: List[Dict[str, Any]] = [{"device_id": str(self.device.index or 0)}
                                         if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else {}
                                         for p in providers]
        try:
            self.session = ort.InferenceSession(str(self.artifact.path), opts, providers=providers,
                                                provider_options=options)
        except Exception as exc:
            raise EngineError(f"onnxruntime could not load {self.artifact.path}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if json.loads(meta.get("zmask.tap_names", "{}")) != self.artifact.tap_names:
            raise EngineError(f"{self.artifact.path}: tap outputs in the file do not match the requested layers")
        self._np_dtype = _NP_DTYPES[cfg.precision]
        self._io_dtype = _TORCH_DTYPES[cfg.precision]
        self._names = list(self.artifact.output_names)
        used = self.session.get_providers()
        self._binding = self.device.type == "cuda" and "CUDAExecutionProvider" in used
        self._shapes = self._probe_shapes()
        self.info = {"providers": used, "onnx": str(self.artifact.path), "onnx_cache_hit": self.artifact.hit,
                     "io_binding": self._binding, "intra_op_threads": cfg.threads,
                     "tap_names": dict(self.artifact.tap_names)}

    def defended(self, cal: Any) -> Optional[Engine]:
        """The Z-Mask first pass as one graph in this runtime (``ort_defended``); None off CPU / fp32."""
        if self.device.type != "cpu" or self.cfg.precision != "fp32":
            return None
        from .ort_defended import DefendedOrtEngine
        return DefendedOrtEngine(self._model, cal, self.cfg, self.fingerprint, self.model_name, self.mean_color)

    def _probe_shapes(self) -> List[Tuple[int, ...]]:
        """Per-output shape without the batch axis, from one run (also proves the session works)."""
        x = np.random.default_rng(0).random((1, 3, *self.cfg.input_shape)).astype(self._np_dtype)
        try:
            outs = self.session.run(self._names, {self.artifact.input_name: x})
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on a probe input: {' '.join(str(exc).split())[:300]}") from exc
        return [tuple(o.shape[1:]) for o in outs]

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = x.to(self._io_dtype).contiguous()
        if self._binding:
            return self._run_bound(x)
        outs = self.session.run(self._names, {self.artifact.input_name: x.cpu().numpy()})
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def _run_bound(self, x: torch.Tensor) -> List[torch.Tensor]:
        """CUDA: bind torch's buffers; torch's stream is synchronised first (ORT runs on its own stream)."""
        n, dev = x.shape[0], self.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.artifact.input_name, "cuda", dev, self._np_dtype, tuple(x.shape), x.data_ptr())
        outs = [torch.empty((n, *s), dtype=self._io_dtype, device=self.device) for s in self._shapes]
        for name, t in zip(self._names, outs):
            binding.bind_output(name, "cuda", dev, self._np_dtype, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return outs
