"""``compile`` backend: ``torch.compile`` of the tapped module.

The taps are outputs of ``TapModule.forward`` (not hooks), so they are part of the compiled graph.
Compilation happens lazily on the first call (and again when the batch size first changes, after
which dynamo marks the batch dynamic). With ``cuda_graph`` the compile mode becomes
``reduce-overhead`` (inductor's own CUDA graphs) instead of a manual capture. On CPU, inductor
generates C++ and needs a compiler (``$CXX``, g++, c++ or clang++).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, List, Tuple

import torch

from .registry import register_engine
from .torch_engine import TorchEngine


def cxx_compiler() -> str:
    """Path of the C++ compiler inductor would find on CPU, or '' when there is none."""
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return str(shutil.which(cand))
    return ""


@register_engine
class CompileEngine(TorchEngine):
    """``torch.compile`` (backend ``cfg.compile_backend``, mode ``cfg.compile_mode``) of the tapped module."""

    name = "compile"

    @classmethod
    def available(cls) -> Tuple[bool, str]:
        if not hasattr(torch, "compile"):
            return False, f"torch {torch.__version__} has no torch.compile"
        cxx = cxx_compiler()
        if not cxx and not torch.cuda.is_available():
            return False, "torch.compile (inductor) on CPU needs a C++ compiler; none found (set CXX)"
        return True, f"torch.compile, torch {torch.__version__}" + (f", C++ compiler {cxx}" if cxx else "")

    def _prepare_core(self) -> Any:
        mode = self.cfg.compile_mode
        if self.cfg.cuda_graph and mode is None:
            mode = "reduce-overhead"
        self.info_compile = {"compile_backend": self.cfg.compile_backend, "compile_mode": mode}
        return torch.compile(self.module, backend=self.cfg.compile_backend, mode=mode)

    def _capture(self) -> None:
        """CUDA graphs come from the ``reduce-overhead`` compile mode; compile and record them now."""
        self.warmup(runs=3)

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.cfg.cuda_graph:
            torch.compiler.cudagraph_mark_step_begin()
        outs = list(self._eager(x))
        # cudagraph-backed outputs are overwritten by the next replay: hand out copies
        return [o.clone() for o in outs] if self.cfg.cuda_graph else outs

    def describe(self) -> dict:
        return {**super().describe(), **self.info_compile}
