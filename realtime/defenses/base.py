"""One interface for every defense, so the pipeline and the benchmarks treat them alike.

A defense is called on an image batch ``x`` (N,3,H,W) in [0,1] and returns a ``DefenseResult``:
the model output on the defended input, that input, and — depending on what the defense can do —
a keep-mask (pre-processing / localising defenses), a per-frame flag and a score (detectors).
``masks`` / ``flags`` say which of these a defense provides; the others are ``None``.

Stage times: every defense accepts an optional ``timer``; ``with timer("backbone"): ...`` wraps each
stage so a benchmark can time them (synchronising the GPU as it sees fit) without the defense
knowing about clocks. Stage names in use: preprocess (input-side work such as LGS's gradient
map), saliency (extra backward passes), backbone (first model pass, with taps), heatmaps, fusion,
mask (mask + repaint), detector (a separate detection network or score), second_pass (the model on
the defended input), postprocess.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, Optional

import torch
from torch import nn

from realtime.core.types import DefenseResult, StageTimer, dilate, null_timer, repaint, validate_input


class Defense(abc.ABC):
    """Base class: subclasses set ``name``, ``masks``, ``flags`` and implement ``run``."""
    name: ClassVar[str] = "defense"
    masks: ClassVar[bool] = False     # produces a pixel keep-mask
    flags: ClassVar[bool] = False     # produces a per-frame flag and score
    needs_grad: ClassVar[bool] = False  # runs backward passes through the model (no engines, no inference_mode)
    # takes ``prior``: a keep-mask carried from earlier frames, applied before the first pass
    accepts_prior: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abc.abstractmethod
    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        """Defend a validated batch; wrap each stage in ``timer(stage)``."""

    def __call__(self, x: torch.Tensor, timer: Optional[StageTimer] = None,
                 prior: Optional[torch.Tensor] = None) -> DefenseResult:
        """Validate ``x`` and defend it. ``prior`` (N,1,H,W) keep-mask: only for ``accepts_prior`` defenses."""
        validate_input(x)
        if prior is None:
            return self.run(x, timer or null_timer)
        if not self.accepts_prior:
            raise TypeError(f"defense {self.name!r} does not take a prior mask")
        return self.run(x, timer or null_timer, prior=prior)   # type: ignore[call-arg]

    def plain(self, x: torch.Tensor) -> Any:
        """The undefended model on ``x`` (what a fail-open policy emits when the defense fails)."""
        return self.model(x)

    def describe(self) -> Dict[str, Any]:
        """Settings worth recording next to results (subclasses extend)."""
        return {"defense": self.name, "masks": self.masks, "flags": self.flags}


__all__ = ["Defense", "DefenseResult", "StageTimer", "dilate", "null_timer", "repaint"]
