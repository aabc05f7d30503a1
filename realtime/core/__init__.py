"""The ground floor every other part builds on: shared types, the registry, taps, devices, metrics.

Nothing in ``realtime.core`` imports any other part of the project (checked by
``tests/test_layering.py``), so models, defenses, engines, kernels and the live pipeline can all
depend on it without cycles. The names below are loaded on first use, so importing a light module
(``realtime.core.signals``, ``.errors``) does not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"DataNotFoundError": "errors", "UsageError": "errors", "Registry": "registry",
          "DefenseResult": "types", "StageTimer": "types", "dilate": "types", "null_timer": "types",
          "repaint": "types", "validate_input": "types"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = ["DataNotFoundError", "DefenseResult", "Registry", "StageTimer", "UsageError", "dilate", "null_timer",
           "repaint", "validate_input"]
