"""The ground floor every other part builds on: shared types, the registry, taps, devices, metrics.

Nothing in ``realtime.core`` imports any other part of the project (checked by
``tests/test_layering.py``), so models, defenses, engines, kernels and the live pipeline can all
depend on it without cycles.
"""
from .errors import DataNotFoundError, UsageError
from .registry import Registry
from .types import DefenseResult, StageTimer, dilate, null_timer, repaint, validate_input

__all__ = ["DataNotFoundError", "DefenseResult", "Registry", "StageTimer", "UsageError", "dilate", "null_timer",
           "repaint", "validate_input"]
