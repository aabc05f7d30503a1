"""Activation taps: every hooked feature map of a model from ONE forward pass.

``ActivationTaps`` registers forward hooks once, at construction; they record only while the tap
object itself is running a forward pass, so plain ``model(x)`` calls (e.g. Z-Mask's second pass)
cost nothing and leave nothing behind. ``EngineTaps`` wraps an exported engine that already returns
``(output, {layer: map})`` so Z-Mask can run on either.

Rules for what is recorded:
* Maps stay on the model's device and keep their autograd history when grad is enabled (attacks
  differentiate through them); under ``torch.no_grad()`` they naturally carry none.
* A module returning a tuple/list/dict contributes its first tensor, depth first (dicts in insertion
  order).
* A module called several times in one forward contributes its FIRST call; ``calls`` tells how
  many times each hook fired in the last pass.
* If a recorded tensor is modified in place later in the forward (e.g. an ``inplace=True`` ReLU on
  it), the map would silently be wrong: this is detected (tensor version counter) and raised; use
  ``clone=True`` (a copy per map) or hook another module.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

TapOutput = Tuple[Any, Dict[str, torch.Tensor]]


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor in a (nested) tuple/list/dict, depth first; None if there is none."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def _version_of(t: torch.Tensor) -> Optional[int]:
    """In-place modification counter; None for inference-mode tensors, which do not keep one."""
    try:
        return t._version
    except RuntimeError:
        return None


def _unique(names: Sequence[str]) -> List[str]:
    """Names in first-seen order without repeats."""
    return list(dict.fromkeys(names))


class ActivationTaps:
    """Forward hooks on named modules of ``model``; ``taps(x)`` -> ``(model(x), {name: map})``."""

    def __init__(self, model: nn.Module, layers: Sequence[str], clone: bool = False) -> None:
        if isinstance(layers, str):
            raise TypeError("layers must be a sequence of module names, not a single string")
        self.model = model
        self.clone = clone
        self._layers: Tuple[str, ...] = tuple(_unique(layers))
        if not self._layers:
            raise ValueError("ActivationTaps needs at least one layer")
        modules = dict(model.named_modules())
        missing = [n for n in self._layers if n not in modules or n == ""]
        if missing:
            names = [n for n in modules if n]
            hints = {m: difflib.get_close_matches(m, names, n=5, cutoff=0.5) for m in missing}
            shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
            raise KeyError(f"modules not found in {type(model).__name__}: "
                           + "; ".join(f"{m!r} (close: {hints[m] or 'none'})" for m in missing)
                           + f". Available: {shown}")
        self._active = False
        self._maps: Dict[str, torch.Tensor] = {}
        self._versions: Dict[str, int] = {}
        self.calls: Dict[str, int] = {n: 0 for n in self._layers}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self._layers]

    @property
    def layers(self) -> Tuple[str, ...]:
        """Hooked module names, in order, without repeats."""
        return self._layers

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self._active:
                return
            self.calls[name] += 1
            if name in self._maps:
                return
            t = first_tensor(output)
            if t is None:
                raise TypeError(f"hooked module {name!r} returned no tensor ({type(output).__name__})")
            if self.clone:
                t = t.clone()
            self._maps[name] = t
            self._versions[name] = _version_of(t)
        return hook

    def __call__(self, x: Any) -> TapOutput:
        """One forward pass of the model; returns its output and every hooked map."""
        if not self._handles:
            raise RuntimeError("ActivationTaps was removed; build a new one")
        self._maps, self._versions = {}, {}
        self.calls = {n: 0 for n in self._layers}
        self._active = True
        try:
            out = self.model(x)
        finally:
            self._active = False
            maps, self._maps = self._maps, {}
        absent = [n for n in self._layers if n not in maps]
        if absent:
            raise RuntimeError(f"hooked modules {absent} did not run in the forward pass")
        changed = [n for n in self._layers if _version_of(maps[n]) != self._versions[n]]
        if changed:
            raise RuntimeError(f"outputs of {changed} were modified in place after the hook (an inplace op "
                               f"downstream); use ActivationTaps(..., clone=True) or hook another module")
        return out, {n: maps[n] for n in self._layers}

    def plain(self, x: Any) -> Any:
        """A forward pass that records nothing (hooks stay registered but idle)."""
        return self.model(x)

    @property
    def mean_color(self) -> Optional[torch.Tensor]:
        """The model's fill colour in [0,1] if it declares one (see ``realtime.models.base``)."""
        return model_mean_color(self.model)

    def remove(self) -> None:
        """Unregister the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ActivationTaps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class EngineTaps:
    """Adapter for a callable that already returns ``(output, {layer: map})`` (an exported engine).

    ``layers`` (optional) selects and checks the maps Z-Mask needs; ``mean_color`` is the (1,3,1,1)
    fill colour in [0,1] for shielding (None: let the caller decide).
    """

    def __init__(self, engine: Callable[[torch.Tensor], TapOutput], layers: Optional[Sequence[str]] = None,
                 mean_color: Optional[torch.Tensor] = None) -> None:
        self.engine = engine
        self._layers: Optional[Tuple[str, ...]] = tuple(_unique(layers)) if layers is not None else None
        self._mean_color = mean_color

    @property
    def layers(self) -> Optional[Tuple[str, ...]]:
        return self._layers

    @property
    def mean_color(self) -> Optional[torch.Tensor]:
        return self._mean_color

    def __call__(self, x: Any) -> TapOutput:
        res = self.engine(x)
        if not (isinstance(res, (tuple, list)) and len(res) == 2 and isinstance(res[1], dict)):
            raise TypeError("engine must return (output, {layer: feature map})")
        out, maps = res
        if self._layers is None:
            return out, dict(maps)
        missing = [n for n in self._layers if n not in maps]
        if missing:
            raise KeyError(f"engine did not return taps {missing}; it has {sorted(maps)}")
        return out, {n: maps[n] for n in self._layers}

    def plain(self, x: Any) -> Any:
        """The engine's output alone (engines compute their taps anyway)."""
        return self(x)[0]

    def remove(self) -> None:
        """Nothing to unregister; present for interface parity."""

    def __enter__(self) -> "EngineTaps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def model_mean_color(model: Any) -> Optional[torch.Tensor]:
    """(1,3,1,1) colour in [0,1] that the model normalises to zero, if it can be read off the model.

    Our models expose ``mean_color``; torchvision detectors keep ``transform.image_mean``.
    """
    mc = getattr(model, "mean_color", None)
    if isinstance(mc, torch.Tensor):
        return mc.reshape(1, -1, 1, 1)
    image_mean = getattr(getattr(model, "transform", None), "image_mean", None)
    if image_mean is not None and len(image_mean) == 3:
        return torch.as_tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    return None
