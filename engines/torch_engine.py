"""``torch`` backend: the tapped module in eager PyTorch, with the usual inference speed switches.

* ``channels_last``: module and inputs in NHWC memory format (faster convolutions on tensor cores).
* ``fp16``/``bf16``: autocast (fp16 on CUDA only; bf16 on CUDA and CPU). Outputs come back as float32.
* ``cuda_graph``: the forward at ``cfg.batch`` x ``cfg.input_shape`` is captured once into a CUDA graph
  after a few warm-up passes on a side stream, and replayed from a static input buffer; other input
  shapes run eagerly. Needs a CUDA device.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import Engine
from .config import TORCH_DTYPES, EngineConfig, EngineError, check_device
from .registry import register_engine
from .tapped import TapModule


@register_engine
class TorchEngine(Engine):
    """Eager PyTorch on the tapped module (a private copy of the model)."""

    name = "torch"
    precisions = ("fp32", "fp16", "bf16")

    def __init__(self, model: nn.Module, layers: Sequence[str], cfg: EngineConfig, fingerprint: str,
                 model_name: str, mean_color: Optional[torch.Tensor]) -> None:
        super().__init__(cfg, layers, mean_color, fingerprint, model_name)
        check_device(self.device, self.name)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise EngineError(f"{self.name}: fp16 autocast needs a CUDA device; use bf16 (or fp32) on {self.device}")
        if cfg.cuda_graph and self.device.type != "cuda":
            raise EngineError(f"{self.name}: CUDA graphs need a CUDA device, got {self.device}; drop cuda_graph")
        self.module = TapModule(model, self.layers, probe_shape=cfg.input_shape).to(self.device).eval()
        if cfg.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self._core = self._prepare_core()
        self._graph: Optional[Any] = None
        self._static_in: Optional[torch.Tensor] = None
        self._static_out: Tuple[torch.Tensor, ...] = ()
        self.info = {"channels_last": cfg.channels_last, "autocast": self._autocast_dtype_name(),
                     "cuda_graph": False, "tap_clone": self.module.clone}
        if cfg.cuda_graph:
            self._capture()
            self.info["cuda_graph"] = True

    def _prepare_core(self) -> Any:
        """The callable that runs the tapped module (``compile`` wraps it)."""
        return self.module

    def _autocast_dtype_name(self) -> Optional[str]:
        return None if self.precision == "fp32" else self.precision

    def _autocast(self) -> ContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # no autocast weight-cast cache when a graph is captured (the cache would live outside the graph)
        return torch.autocast(self.device.type, dtype=TORCH_DTYPES[self.precision],
                              cache_enabled=not self.cfg.cuda_graph)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _eager(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        with torch.no_grad(), self._autocast():
            return tuple(self._core(self._layout(x)))

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one forward into a CUDA graph with a static input."""
        dev = self.device
        self._static_in = self._layout(torch.rand(self.cfg.batch, 3, *self.cfg.input_shape, device=dev))
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager(self._static_in)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._static_out = self._eager(self._static_in)
        except Exception as exc:
            raise EngineError(f"{self.name}: CUDA graph capture failed: {' '.join(str(exc).split())[:300]}") from exc
        self._graph = graph

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self._graph is not None and self._static_in is not None and x.shape == self._static_in.shape:
            self._static_in.copy_(x)
            self._graph.replay()
            return [o.clone() for o in self._static_out]      # the next replay overwrites the static outputs
        return list(self._eager(x))
