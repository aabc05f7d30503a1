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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .zmask import validate_input

StageTimer = Callable[[str], AbstractContextManager]


def null_timer(_stage: str) -> AbstractContextManager:
    """The default timer: times nothing."""
    return nullcontext()


@dataclass
class DefenseResult:
    """What one defense call produced. Masks: 1 = pixel kept, 0 = masked / repainted / suppressed."""
    output: Any                                   # model output on ``defended_input`` (what downstream uses)
    defended_input: torch.Tensor                  # (N,3,H,W) input of the final model pass
    mask: Optional[torch.Tensor] = None           # (N,1,H,W) float keep-mask; None if the defense never masks
    flagged: Optional[torch.Tensor] = None        # (N,) bool attack flag; None if the defense never flags
    score: Optional[torch.Tensor] = None          # (N,) float, higher = more likely attacked
    first_output: Any = None                      # output of an undefended first pass, when one ran
    extras: Dict[str, Any] = field(default_factory=dict)   # defense-specific maps (heatmaps, saliency...)


class Defense(abc.ABC):
    """Base class: subclasses set ``name``, ``masks``, ``flags`` and implement ``run``."""
    name: ClassVar[str] = "defense"
    masks: ClassVar[bool] = False     # produces a pixel keep-mask
    flags: ClassVar[bool] = False     # produces a per-frame flag and score
    needs_grad: ClassVar[bool] = False  # runs backward passes through the model (no engines, no inference_mode)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abc.abstractmethod
    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        """Defend a validated batch; wrap each stage in ``timer(stage)``."""

    def __call__(self, x: torch.Tensor, timer: Optional[StageTimer] = None) -> DefenseResult:
        validate_input(x)
        return self.run(x, timer or null_timer)

    def describe(self) -> Dict[str, Any]:
        """Settings worth recording next to results (subclasses extend)."""
        return {"defense": self.name, "masks": self.masks, "flags": self.flags}


def repaint(x: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``x * keep + fill * (1 - keep)``; ``keep`` (N,1,H,W) in [0,1], ``fill`` broadcastable to x."""
    k = keep.to(dtype=x.dtype, device=x.device)
    return x * k + fill.to(dtype=x.dtype, device=x.device) * (1.0 - k)


def dilate(region: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a (N,1,H,W) {0,1} map with a (2r+1)^2 square.

    Separable: a (1,k) then a (k,1) max equals the k x k max exactly, at ~1/10 of the cost on CPU
    (a 33x33 window at 360x480 took ~200 ms in one pass; measured)."""
    if radius <= 0:
        return region
    k = 2 * radius + 1
    region = F.max_pool2d(region, (1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(region, (k, 1), stride=1, padding=(radius, 0))


__all__ = ["Defense", "DefenseResult", "StageTimer", "dilate", "null_timer", "repaint"]
