"""The live pipeline's stage clock: no device-wide synchronisation on the hot path.

On the CPU a stage is timed with ``perf_counter`` (nothing to wait for). On CUDA each stage boundary
records a timing ``torch.cuda.Event`` on the current stream, so a stage's time is its own span on the
device timeline and the host never blocks at a boundary; the spans are read (``Timings.resolve``)
once per frame, after the frame's result has come back to the host, by then every event recorded
for it has completed. Host-only stages (the vote) are always timed with ``perf_counter``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


def _now_ms() -> float:
    return time.perf_counter() * 1000.0


class Timings:
    """Stage spans of one step: ``add(stage, start, end)`` with marks from ``Clock.mark``."""

    def __init__(self) -> None:
        self.spans: List[Tuple[str, Any, Any]] = []
        self._ms: Optional[Dict[str, float]] = None

    def add(self, stage: str, start: Any, end: Any) -> None:
        self.spans.append((stage, start, end))
        self._ms = None

    def result(self) -> Dict[str, float]:
        """Milliseconds per stage (repeated spans summed), computed once. A CUDA span waits for its
        own end event only (never the device), so call this after the frame's result reached the host."""
        if self._ms is None:
            out: Dict[str, float] = {}
            for stage, a, b in self.spans:
                if isinstance(a, float):
                    ms = b - a
                else:
                    b.synchronize()
                    ms = float(a.elapsed_time(b))
                out[stage] = out.get(stage, 0.0) + ms
            self._ms = out
        return dict(self._ms)


class Clock:
    """Stage marks: floats (ms, ``perf_counter``) on the CPU, recorded CUDA timing events on CUDA.

    ``event`` makes one timing event (default ``torch.cuda.Event(enable_timing=True)``); tests pass
    a stand-in to check the CUDA path without a GPU."""

    def __init__(self, device: torch.device, event: Optional[Callable[[], Any]] = None) -> None:
        self.events = device.type == "cuda" or event is not None
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))

    def mark(self, host: bool = False) -> Any:
        """A stage boundary: ms now (CPU, or ``host`` stages), else an event recorded on the stream."""
        if host or not self.events:
            return _now_ms()
        ev = self._event()
        ev.record()
        return ev

    def __call__(self) -> float:
        """Host milliseconds (never synchronises)."""
        return _now_ms()


__all__ = ["Clock", "Timings"]
