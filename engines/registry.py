"""Engine registry: ``build_engine(model, layers, cfg)`` for every backend, so ``--engine NAME`` works uniformly.

Each backend module decorates its class with ``@register_engine``; the built-in modules are imported
on first use. Backends report ``available() -> (ok, reason)`` cheaply (no GPU work, no compilation),
and ``build_engine`` turns an unavailable backend, an unsupported precision or device into one clear
``EngineError``/``EngineUnavailable`` line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

from torch import nn

from realtime.core.registry import Registry
from realtime.core.taps import model_mean_color
from realtime.models import build_model, fingerprint

from .config import EngineConfig, EngineError, EngineUnavailable

BUILTIN_MODULES = ("engines.torch_engine", "engines.compile_engine", "engines.ort_engine", "engines.trt_engine",
                   "engines.torch_trt_engine")

ENGINES: Registry[Type[Any]] = Registry("engine", builtins=BUILTIN_MODULES)


def register_engine(cls: Type[Any]) -> Type[Any]:
    """Class decorator: register a backend under ``cls.name`` (names are unique)."""
    return ENGINES.register(cls.name)(cls)


def list_engines() -> List[str]:
    """Registered backend names: torch, compile, onnxruntime, tensorrt, torch_tensorrt, then any others."""
    return ENGINES.names()


def engine_class(name: str) -> Type[Any]:
    """The class of backend ``name``; unknown names list the known ones."""
    return ENGINES.get(name)


def available_engines() -> Dict[str, Tuple[bool, str]]:
    """``{name: (usable here, reason)}`` for every registered backend."""
    out: Dict[str, Tuple[bool, str]] = {}
    for name in list_engines():
        cls = ENGINES.get(name)
        try:
            out[name] = cls.available()
        except Exception as exc:  # an availability probe must never take the caller down
            out[name] = (False, f"availability check failed: {type(exc).__name__}: {exc}")
    return out


def build_engine(model_or_name: Union[str, nn.Module], layers: Sequence[str] = (),
                 cfg: Optional[EngineConfig] = None, **overrides: Any) -> Any:
    """An engine running ``model_or_name`` (a registered model name or a module) and returning ``layers``.

    ``cfg`` fields may be overridden by keyword (``build_engine("ddrnet23_slim", ["layer3"],
    backend="onnxruntime")``). A model name builds the model with its shipped weights on ``cfg.device``.
    """
    cfg = dataclasses.replace(cfg or EngineConfig(), **overrides) if overrides else (cfg or EngineConfig())
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of module names, not a single string")
    cls = engine_class(cfg.backend)
    ok, reason = cls.available()
    if not ok:
        raise EngineUnavailable(f"engine {cfg.backend!r} is not available: {reason}")
    if cfg.precision not in cls.precisions:
        raise EngineError(f"engine {cfg.backend!r} supports precision {', '.join(cls.precisions)}, not {cfg.precision}")
    if isinstance(model_or_name, str):
        model = build_model(model_or_name, weights="default", device=cfg.device)
        name = model_or_name
    elif isinstance(model_or_name, nn.Module):
        model = model_or_name
        name = getattr(model, "model_name", None) or type(model).__name__
    else:
        raise TypeError(f"build_engine needs a model name or an nn.Module, got {type(model_or_name).__name__}")
    layers = tuple(dict.fromkeys(layers))
    modules = dict(model.named_modules())
    missing = [n for n in layers if not n or n not in modules]
    if missing:
        raise KeyError(f"layers {missing} are not modules of {name}")
    was_training = model.training
    model.eval()
    try:
        return cls(model, layers, cfg, fingerprint(model), name, model_mean_color(model))
    finally:
        model.train(was_training)
