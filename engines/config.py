"""Engine configuration (one dataclass for every backend), engine errors and the on-disk cache location."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
CACHE_ENV = "REALTIME_ENGINE_CACHE"
DEFAULT_CACHE = Path("~/.cache/zmask-realtime/engines")

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EngineError(RuntimeError):
    """An engine cannot be built or run as configured; the message is one user-facing line."""


class EngineUnavailable(EngineError):
    """The backend's runtime is not installed (or cannot work) on this machine."""


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine. Fields a backend does not use are ignored by it.

    ``input_shape`` (H, W) is what exported engines (ONNX, TensorRT) are built for; eager/compiled torch
    accept any size. ``batch`` is the export batch, the CUDA-graph batch and TensorRT's optimal batch;
    exported engines accept any batch from 1 to ``max_batch`` (dynamic batch axis).
    ``cache_dir``: exported files (ONNX, TensorRT plans, timing caches); None means ``$REALTIME_ENGINE_CACHE``
    or ``~/.cache/zmask-realtime/engines``. ``rebuild`` ignores cached files and writes new ones.
    """
    backend: str = "torch"
    device: str = "cpu"
    precision: str = "fp32"
    input_shape: Tuple[int, int] = (360, 480)
    batch: int = 1
    max_batch: int = 8
    channels_last: bool = False
    cuda_graph: bool = False
    cache_dir: Optional[str] = None
    rebuild: bool = False
    opset: int = 17
    threads: Optional[int] = None                   # onnxruntime intra-op threads (None: its default)
    providers: Optional[Tuple[str, ...]] = None     # onnxruntime providers to use instead of the automatic choice
    compile_backend: str = "inductor"              # torch.compile backend
    compile_mode: Optional[str] = None             # torch.compile mode (None, "reduce-overhead", "max-autotune")
    workspace_gb: float = 2.0                      # TensorRT builder workspace
    calib_frames: int = 64                         # INT8 calibration frames (CamVid train)
    calib_data: Optional[str] = None               # CamVid root for calibration (None: the default lookup)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        shape = tuple(int(v) for v in self.input_shape)
        if len(shape) != 2 or min(shape) < 8:
            raise ValueError(f"input_shape must be (H, W) with H, W >= 8, got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        if self.batch < 1 or self.max_batch < self.batch:
            raise ValueError(f"need 1 <= batch <= max_batch, got batch={self.batch}, max_batch={self.max_batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.opset < 11:
            raise ValueError(f"opset must be >= 11, got {self.opset}")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def cache_root(self) -> Path:
        """Where this engine's files live: ``cache_dir``, else the environment override, else the default."""
        root = self.cache_dir or os.environ.get(CACHE_ENV) or str(DEFAULT_CACHE)
        return Path(root).expanduser()


def check_device(device: torch.device, what: str) -> None:
    """Raise EngineError when ``device`` is CUDA but no GPU is visible (``what`` names the backend)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"{what}: device {device} requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise EngineError(f"{what}: unsupported device {device} (use cpu or cuda[:N])")
