"""The runtime interface every backend implements.

``engine(x) -> (logits, {layer: map})`` and ``engine.plain(x) -> logits`` for a float (N,3,H,W) batch
in [0,1]; outputs are float32 torch tensors on ``engine.device`` whatever the compute precision, so
Z-Mask's statistics and thresholds apply unchanged. ``Engine`` subclasses ``EngineTaps``, so
``ZMask(engine, cfg, stats, fusion)`` runs the defense on any backend.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from realtime.core.taps import EngineTaps

from .config import EngineConfig, EngineError


class Engine(EngineTaps, abc.ABC):
    """Base class: subclasses set ``name``/``precisions``, implement ``available`` and ``_run``."""

    name: ClassVar[str] = "engine"
    precisions: ClassVar[Tuple[str, ...]] = ("fp32",)
    static_shape: ClassVar[bool] = False      # True: H, W must equal cfg.input_shape

    def __init__(self, cfg: EngineConfig, layers: Sequence[str], mean_color: Optional[torch.Tensor],
                 fingerprint: str, model_name: str) -> None:
        super().__init__(self._forward, tuple(layers), mean_color)
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.info: Dict[str, Any] = {}      # backend details for describe() (providers, cache paths ...)

    @classmethod
    def available(cls) -> Tuple[bool, str]:
        """(usable on this machine, why not / what it uses). Must be cheap and never raise."""
        return True, "built in"

    @property
    def layers(self) -> Tuple[str, ...]:
        return self._layers or ()

    @property
    def device(self) -> torch.device:
        return self.cfg.torch_device

    @property
    def precision(self) -> str:
        return self.cfg.precision

    def check_input(self, x: Any) -> torch.Tensor:
        """``x`` as a float32 (N,3,H,W) tensor on the engine's device, or a ValueError saying what is wrong."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name} engine expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} engine expects an image batch (N,3,H,W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name} engine expects a floating image in [0,1], got dtype {x.dtype} "
                             "(convert uint8 frames with x.float() / 255)")
        n, _, h, w = x.shape
        if n < 1:
            raise ValueError(f"{self.name} engine got an empty batch")
        if self.static_shape and (h, w) != tuple(self.cfg.input_shape):
            raise ValueError(f"{self.name} engine was built for {self.cfg.input_shape[0]}x{self.cfg.input_shape[1]} "
                             f"inputs, got {h}x{w}; rebuild it with EngineConfig(input_shape=({h}, {w}))")
        if self.static_shape and n > self.cfg.max_batch:
            raise ValueError(f"{self.name} engine accepts batches up to {self.cfg.max_batch}, got {n}")
        return x.to(device=self.device, dtype=torch.float32)

    @abc.abstractmethod
    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        """[logits, tap_0, ...] (layers order) for a checked float32 batch on the engine's device."""

    def _forward(self, x: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        outs = self._run(self.check_input(x))
        if len(outs) != 1 + len(self.layers):
            raise EngineError(f"{self.name} engine produced {len(outs)} outputs, expected {1 + len(self.layers)}")
        outs = [o.float() for o in outs]
        return outs[0], dict(zip(self.layers, outs[1:]))

    def __call__(self, x: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One pass: ``(logits, {layer: map})``, all float32 on ``self.device``."""
        return self._forward(x)

    def plain(self, x: Any) -> torch.Tensor:
        """The logits alone (the taps are computed anyway: they are part of the built graph)."""
        return self._forward(x)[0]

    def warmup(self, runs: int = 2, batch: Optional[int] = None) -> None:
        """A few passes at the built input size (first-call costs: autotuning, allocations, lazy init)."""
        x = torch.rand(batch or self.cfg.batch, 3, *self.cfg.input_shape, device=self.device)
        with torch.inference_mode():
            for _ in range(runs):
                self._forward(x)

    def describe(self) -> Dict[str, Any]:
        """JSON-friendly summary: backend, device, precision, layers, shape, model and backend details."""
        return {"engine": self.name, "device": str(self.device), "precision": self.precision,
                "layers": list(self.layers), "input_shape": list(self.cfg.input_shape),
                "static_shape": self.static_shape, "model": self.model_name, "fingerprint": self.fingerprint,
                **self.info}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model_name!r}, device={self.device}, "
                f"precision={self.precision}, layers={list(self.layers)})")
