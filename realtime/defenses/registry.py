"""Defense registry: ``build_defense(name, ctx)`` for every defense, so ``--defense NAME`` works uniformly.

Each defense module registers a builder ``fn(ctx: DefenseContext, **options) -> Defense`` with
``@register_defense("name")``. The built-in modules are imported on first use (not at package import,
which keeps ``import realtime.defenses`` light and free of cycles).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
from torch import nn

from realtime.core.registry import Registry

from .base import Defense
from realtime.models.registry import model_slug

REPO = Path(__file__).resolve().parents[2]

# Modules whose import registers the built-in defenses.
BUILTIN_MODULES = (
    "realtime.defenses.zmask_defense",      # zmask, none
    "realtime.defenses.cue",                # zmask_cue
    "realtime.defenses.lgs",                # lgs, slgs, wlgs
    "realtime.defenses.overactivation",     # fpda, hn
    "realtime.defenses.patchzero",          # patchzero
    "realtime.defenses.taintradar",         # taintradar
)

Builder = Callable[..., Defense]
# The defenses built on ZMask: they take ``threshold`` and ``heatmap_backend`` and expose ``.zm``.
ZMASK_VARIANTS = ("zmask", "zmask_cue")
DEFENSES: Registry[Builder] = Registry("defense", builtins=BUILTIN_MODULES)


@dataclass
class DefenseContext:
    """What a builder may need: the model (and its registry name), device, data and artifact paths.

    ``calibration``: a Z-Mask artifact (default ``calibration/shipped/<model_name>.safetensors``);
    ``loaded_calibration``: that artifact already loaded and checked against the model (not read again);
    ``artifacts``: folder of other shipped per-model artifacts (thresholds, PatchZero weights);
    ``data``: CamVid root for defenses that fit something on clean frames (None: the default lookup);
    ``engine``: a runtime from ``engines`` (``engine(x) -> (out, taps)``, ``engine.plain(x)``) that
    forward-only defenses run instead of the module (gradient-based ones always use ``model``).
    """
    model: nn.Module
    model_name: str
    engine: Optional[Any] = None
    device: torch.device = torch.device("cpu")
    calibration: Optional[Path] = None
    loaded_calibration: Optional[Any] = None     # the artifact at ``calibration``, when the caller loaded it
    artifacts: Path = REPO / "calibration" / "shipped"
    data: Optional[str] = None

    def calibration_path(self) -> Path:
        return Path(self.calibration) if self.calibration else self.artifacts / f"{model_slug(self.model_name)}.safetensors"

    def forward(self) -> Callable[[torch.Tensor], Any]:
        """The plain forward pass: the engine's when one is set, else the module's."""
        return self.engine.plain if self.engine is not None else self.model


def register_defense(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn`` as the builder of defense ``name`` (names are unique)."""
    return DEFENSES.register(name)


def list_defenses() -> List[str]:
    """Registered defense names, ``none`` first, then alphabetical."""
    return sorted(DEFENSES.names(), key=lambda n: (n != "none", n))


def build_defense(name: str, ctx: DefenseContext, **options: Any) -> Defense:
    """Build defense ``name`` for ``ctx.model``; unknown names list the known ones."""
    if name not in DEFENSES:
        raise KeyError(f"unknown defense {name!r}; available: {', '.join(list_defenses())}")
    return DEFENSES.get(name)(ctx, **options)


__all__ = ["BUILTIN_MODULES", "DEFENSES", "ZMASK_VARIANTS", "DefenseContext", "build_defense", "list_defenses", "register_defense"]
