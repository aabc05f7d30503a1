"""``TapModule``: a model whose forward returns ``(logits, *taps)``, the taps being real outputs, not hooks.

Each tapped submodule of a private copy of the model is replaced by a ``_Recorder`` that runs it and
keeps its first output tensor; the wrapper's forward returns those tensors after the logits. Because
the taps are ordinary values flowing to the module's outputs, they survive ``torch.compile``,
``torch.onnx.export`` (they become named graph outputs) and torch-tensorrt, where forward hooks would
be dropped or cause graph breaks.

Same recording rules as ``realtime.core.taps.ActivationTaps``: the first tensor of a tuple/dict
output, the first call of a module called several times. A tapped tensor modified in place later in
the forward would be returned modified; ``needs_clone`` detects that once on a probe input (with the
eager hook-based taps, which check version counters) and the recorders then keep a copy.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from realtime.core.taps import ActivationTaps, first_tensor


class _Recorder(nn.Module):
    """Stands in for a tapped submodule: runs it unchanged and records its first output tensor."""

    def __init__(self, inner: nn.Module, name: str, slots: Dict[str, torch.Tensor], clone: bool) -> None:
        super().__init__()
        self.inner = inner
        self.tap_name = name
        self.clone = clone
        self.__dict__["_slots"] = slots       # shared with the TapModule; a plain dict, not a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if self.tap_name not in self._slots:
            t = first_tensor(out)
            if t is None:
                raise TypeError(f"tapped module {self.tap_name!r} returned no tensor ({type(out).__name__})")
            self._slots[self.tap_name] = t.clone() if self.clone else t
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def needs_clone(model: nn.Module, layers: Sequence[str], input_shape: Tuple[int, int]) -> bool:
    """True when a tapped map is modified in place later in the forward (so recorders must copy it)."""
    if not layers:
        return False
    p = next(model.parameters(), None)
    probe = torch.rand(1, 3, *input_shape, device=p.device if p is not None else "cpu")
    taps = ActivationTaps(model, layers)
    try:
        with torch.no_grad():            # not inference_mode: version counters must be kept
            taps(probe)
    except RuntimeError as exc:
        if "modified in place" in str(exc):
            return True
        raise
    finally:
        taps.remove()
    return False


class TapModule(nn.Module):
    """``TapModule(model, layers)(x) -> (logits, tap_0, ..., tap_k)`` in ``layers`` order.

    Works on a deep copy of ``model`` (the caller's model is never modified), so a backend may
    cast it, change its memory format or compile it freely. ``clone=None`` probes whether copies are
    needed (see ``needs_clone``) at ``probe_shape``. One call at a time (the recorders share one dict).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], clone: Optional[bool] = None,
                 probe_shape: Tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        if isinstance(layers, str):
            raise TypeError("layers must be a sequence of module names, not a single string")
        self.layers: Tuple[str, ...] = tuple(dict.fromkeys(layers))
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if not n or n not in modules]
        if missing:
            raise KeyError(f"modules not found in {type(model).__name__}: {missing}")
        nested = [(a, b) for a in self.layers for b in self.layers if a != b and b.startswith(a + ".")]
        if nested:
            raise ValueError(f"cannot tap a module and one inside it at once: {nested[0]}")
        self.clone = needs_clone(model, self.layers, probe_shape) if clone is None else bool(clone)
        self.model = copy.deepcopy(model).eval()
        for m in self.model.modules():      # hooks of the caller (e.g. ActivationTaps) stay on its model
            m._forward_hooks.clear()
        self.__dict__["_slots"] = {}
        for name in self.layers:
            inner = self.model.get_submodule(name)
            _set_submodule(self.model, name, _Recorder(inner, name, self._slots, self.clone))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._slots.clear()
        out = first_tensor(self.model(x))
        if out is None:
            raise TypeError("the model returned no tensor")
        taps: List[torch.Tensor] = []
        for name in self.layers:
            if name not in self._slots:
                raise RuntimeError(f"tapped module {name!r} did not run in the forward pass")
            taps.append(self._slots[name])
        self._slots.clear()
        return (out, *taps)


def onnx_names(layers: Sequence[str]) -> Dict[str, str]:
    """A unique, portable tensor name per layer: ``tap_`` + the name with non-alphanumerics as ``_``."""
    names: Dict[str, str] = {}
    used = {"input", "logits"}
    for layer in layers:
        base = "tap_" + re.sub(r"[^0-9A-Za-z_]", "_", layer)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        names[layer] = name
    return names
