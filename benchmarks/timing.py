"""Timing harness for the latency benchmark: per-stage timers, interleaved rounds, summaries, memory.

A ``FrameTimer`` is the ``StageTimer`` handed to a defense (``with timer("backbone"): ...``). On CPU a
stage is timed with the host clock; on CUDA with a pair of CUDA events on the current stream (no sync
inside the frame, so timing does not change the schedule); the events are resolved once the frame has
finished. ``measure`` runs every entry (a defense, or the temporal mask-reuse path) on the same frames,
interleaved frame by frame: in round r each entry processes clean frame r, then attacked frame r, and
the order of the entries rotates by one every round, so load changes hit every entry alike. Warm-up
rounds run the same way and are discarded.
"""
from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

Clock = Callable[[], float]          # seconds, monotonic (time.perf_counter or a fake in tests)
PERCENTILES = (50, 95, 99)


class FrameTimer:
    """Stage timer for one frame: ``timer(stage)`` context managers, repeated stages accumulate."""

    def __init__(self, device: torch.device = torch.device("cpu"), clock: Clock = time.perf_counter) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock
        self._host: Dict[str, float] = {}
        self._events: List[Tuple[str, Any, Any]] = []
        self.order: List[str] = []

    def _seen(self, stage: str) -> None:
        if stage not in self.order:
            self.order.append(stage)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._seen(stage)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((stage, start, end))
        else:
            t0 = self.clock()
            try:
                yield
            finally:
                self.add(stage, (self.clock() - t0) * 1000.0)

    def add(self, stage: str, ms: float) -> None:
        """Record a stage measured elsewhere (e.g. by the live pipeline's own clock)."""
        self._seen(stage)
        self._host[stage] = self._host.get(stage, 0.0) + float(ms)

    def stages(self) -> Dict[str, float]:
        """Milliseconds per stage in first-seen order (synchronises CUDA to resolve the events)."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for stage, start, end in self._events:
                out[stage] = out.get(stage, 0.0) + float(start.elapsed_time(end))
        return {s: out[s] for s in self.order if s in out}


@dataclass
class Outcome:
    """What one call decided: the attack flag (None: the entry never flags) and an optional path tag."""
    flagged: Optional[bool] = None
    tag: Optional[str] = None


@dataclass
class Entry:
    """A thing to time: ``run(kind, index, timer) -> Outcome`` does the whole frame (pre- to postprocess).

    ``kinds``: which frame kinds it is measured on (``clean``, ``attacked``)."""
    name: str
    run: Callable[[str, int, FrameTimer], Outcome]
    kinds: Tuple[str, ...] = ("clean", "attacked")


@dataclass
class Samples:
    """Per-frame measurements of one entry on one frame kind."""
    total_ms: List[float] = field(default_factory=list)
    stages: List[Dict[str, float]] = field(default_factory=list)
    flagged: List[Optional[bool]] = field(default_factory=list)
    tags: List[Optional[str]] = field(default_factory=list)
    rounds: List[int] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_device_mb: Optional[float] = None


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """n, mean, std, min, max and the 50/95/99th percentiles (linear interpolation) of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("summarize needs at least one value")
    q = np.percentile(a, PERCENTILES)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max()), "median": float(q[0]), "p95": float(q[1]), "p99": float(q[2])}


def stage_medians(stages: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Median time of every stage over frames (a stage absent from a frame counts as 0 ms there)."""
    names: List[str] = []
    for st in stages:
        names += [s for s in st if s not in names]
    return {s: float(np.median([st.get(s, 0.0) for st in stages])) for s in names}


def overhead(defense_ms: Sequence[float], base_ms: Sequence[float]) -> Dict[str, float]:
    """Cost of a defense against the bare backbone: ratio of medians, and median of per-round ratios.

    Both lists are per-round totals from the same interleaved run (``paired`` uses rounds present
    in both, in order)."""
    med_d, med_b = float(np.median(defense_ms)), float(np.median(base_ms))
    n = min(len(defense_ms), len(base_ms))
    paired = float(np.median(np.asarray(defense_ms[:n]) / np.asarray(base_ms[:n]))) if n else float("nan")
    return {"ratio": med_d / med_b, "overhead_pct": 100.0 * (med_d / med_b - 1.0),
            "paired_ratio": paired, "paired_overhead_pct": 100.0 * (paired - 1.0)}


# ---------------------------------------------------------------- memory
_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); False when unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last reset (else since start)."""
    try:
        m = _HWM.search(Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux reports kB


def rss_peak_scope() -> str:
    """How peak RSS is scoped in this process: per call when resettable, else process-wide."""
    return "per-call (VmHWM reset via /proc/self/clear_refs)" if reset_peak_rss() else "process-wide (ru_maxrss)"


# ---------------------------------------------------------------- the interleaved runner
def measure(entries: Sequence[Entry], rounds: int, warmup: int, device: torch.device = torch.device("cpu"),
            clock: Clock = time.perf_counter, rotate: bool = True, progress: bool = False,
            desc: str = "latency") -> Dict[str, Dict[str, Samples]]:
    """Run ``warmup`` discarded rounds then ``rounds`` timed rounds; returns samples[entry][kind].

    A frame's total is host time from before preprocessing to after postprocessing (on CUDA the
    clock is read after ``torch.cuda.synchronize()``), so it is what a consumer of the result waits.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds}, {warmup}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"entry names must be unique, got {names}")
    cuda = device.type == "cuda"
    out: Dict[str, Dict[str, Samples]] = {e.name: {k: Samples() for k in e.kinds} for e in entries}
    for r in tqdm(range(warmup + rounds), desc=desc, unit="round", disable=not progress, leave=False):
        timed = r >= warmup
        shift = r % len(entries) if rotate else 0
        for e in list(entries[shift:]) + list(entries[:shift]):
            for kind in e.kinds:
                index = r - warmup if timed else r
                s = out[e.name][kind]
                timer = FrameTimer(device, clock)
                if timed:
                    reset_peak_rss()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = clock()
                res = e.run(kind, index, timer)
                if cuda:
                    torch.cuda.synchronize(device)
                t1 = clock()
                if not timed:
                    continue
                s.total_ms.append((t1 - t0) * 1000.0)
                s.stages.append(timer.stages())
                s.flagged.append(res.flagged)
                s.tags.append(res.tag)
                s.rounds.append(index)
                s.peak_rss_mb = max(s.peak_rss_mb, peak_rss_mb())
                if cuda:
                    mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
                    s.peak_device_mb = max(s.peak_device_mb or 0.0, mb)
    return out


def summarize_samples(s: Samples, batch: int = 1) -> Dict[str, Any]:
    """Latency summary, FPS (frames per second at the median), stage medians, flag rate, memory."""
    lat = summarize(s.total_ms)
    flags = [f for f in s.flagged if f is not None]
    res: Dict[str, Any] = {"latency_ms": lat, "fps": 1000.0 * batch / lat["median"],
                           "stages_ms": stage_medians(s.stages),
                           "flag_rate": (sum(flags) / len(flags)) if flags else None,
                           "peak_rss_mb": s.peak_rss_mb, "peak_device_mb": s.peak_device_mb}
    if flags:
        hit = [t for t, f in zip(s.total_ms, s.flagged) if f]
        res["flagged_latency_ms"] = summarize(hit) if hit else None
    tags = sorted({t for t in s.tags if t is not None})
    if tags:
        res["paths"] = {t: {"frames": sum(1 for x in s.tags if x == t),
                            "latency_ms": summarize([v for v, x in zip(s.total_ms, s.tags) if x == t]),
                            "stages_ms": stage_medians([st for st, x in zip(s.stages, s.tags) if x == t])}
                        for t in tags}
    return res


__all__ = ["Entry", "FrameTimer", "Outcome", "Samples", "measure", "overhead", "peak_rss_mb", "reset_peak_rss",
           "rss_peak_scope", "stage_medians", "summarize", "summarize_samples"]
