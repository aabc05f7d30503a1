"""``torch_tensorrt`` backend: ``torch_tensorrt.compile`` (dynamo IR) of the tapped module.

The TapModule's outputs (logits, then the taps) are the compiled program's outputs. The batch axis
is dynamic (1..max_batch, optimised for ``cfg.batch``); H, W are fixed. Compiled programs are not
cached on disk (torch-tensorrt's own save/load needs the exact same versions); each build compiles.
``import torch_tensorrt`` raises a plain Exception (not ImportError) when TensorRT's libraries are
missing, hence the broad guard.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import Engine
from .config import TORCH_DTYPES, EngineConfig, EngineError, EngineUnavailable, check_device
from .registry import register_engine
from .tapped import TapModule


def import_torch_tensorrt() -> Any:
    try:
        import torch_tensorrt
    except Exception as exc:
        raise EngineUnavailable(f"torch-tensorrt is not installed: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]}") from None
    return torch_tensorrt


@register_engine
class TorchTensorRTEngine(Engine):
    """Torch-TensorRT ahead-of-time compilation of the tapped module."""

    name = "torch_tensorrt"
    precisions = ("fp32", "fp16", "bf16")
    static_shape = True

    @classmethod
    def available(cls) -> Tuple[bool, str]:
        try:
            ttrt = import_torch_tensorrt()
        except EngineUnavailable as exc:
            return False, str(exc)
        if not torch.cuda.is_available():
            return False, f"torch-tensorrt {ttrt.__version__} is installed but needs a CUDA GPU (none visible)"
        return True, f"torch-tensorrt {ttrt.__version__}"

    def __init__(self, model: nn.Module, layers: Sequence[str], cfg: EngineConfig, fingerprint: str,
                 model_name: str, mean_color: Optional[torch.Tensor]) -> None:
        super().__init__(cfg, layers, mean_color, fingerprint, model_name)
        ttrt = import_torch_tensorrt()
        check_device(self.device, self.name)
        if self.device.type != "cuda":
            raise EngineError(f"torch-tensorrt needs a CUDA device, got {self.device}")
        module = TapModule(model, self.layers, probe_shape=cfg.input_shape).to(self.device).eval()
        h, w = cfg.input_shape
        spec = ttrt.Input(min_shape=(1, 3, h, w), opt_shape=(cfg.batch, 3, h, w), max_shape=(cfg.max_batch, 3, h, w),
                          dtype=torch.float32)
        enabled = {torch.float32} | ({TORCH_DTYPES[cfg.precision]} if cfg.precision != "fp32" else set())
        try:
            self.compiled = ttrt.compile(module, ir="dynamo", inputs=[spec], enabled_precisions=enabled,
                                         workspace_size=int(cfg.workspace_gb * (1 << 30)))
        except Exception as exc:
            raise EngineError(f"torch_tensorrt.compile failed: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
        self.info = {"torch_tensorrt": ttrt.__version__, "enabled_precisions": sorted(str(d) for d in enabled)}

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            return list(self.compiled(x.contiguous()))
