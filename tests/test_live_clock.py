"""The live step's clock: no device-wide synchronisation per stage, CUDA events on CUDA, perf_counter on
CPU; and the batched step (one defense call, one voter per stream) agreeing with per-stream steps."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from realtime.defenses.base import Defense, DefenseResult
from realtime.live.clock import Clock, Timings
from realtime.live.step import DefenseStep
from realtime.live.voting import VotingConfig

LIVE = Path(__file__).resolve().parents[1] / "realtime" / "live"


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], 1 - x[:, :1]], 1)


class _Flagger(Defense):
    """Flags frames brighter than 0.5, masks their left half, second pass on every frame."""
    name, masks, flags, accepts_prior = "fake", True, True, True

    def run(self, x, timer, prior=None):
        with timer("backbone"):
            first = self.model(x)
        with timer("detector"):
            flag = x.mean(dim=(1, 2, 3)) > 0.5
            keep = torch.ones_like(x[:, :1])
            keep[..., : x.shape[-1] // 2] = (~flag).float().view(-1, 1, 1, 1)
        with timer("second_pass"):
            out = self.model(x * keep)
        return DefenseResult(output=out, defended_input=x * keep, mask=keep, flagged=flag,
                             score=x.mean((1, 2, 3)), first_output=first)


class _FakeEvent:
    """Stands in for torch.cuda.Event(enable_timing=True): records host time, counts calls."""
    made = 0

    def __init__(self) -> None:
        _FakeEvent.made += 1
        self.t = None
        self.waited = False

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: "_FakeEvent") -> float:
        assert self.t is not None and end.t is not None, "elapsed_time on an unrecorded event"
        return (end.t - self.t) * 1000.0


@pytest.fixture
def no_sync(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(a))
    return calls


def test_cpu_clock_is_perf_counter_and_never_synchronises(no_sync):
    clock = Clock(torch.device("cpu"))
    assert not clock.events and isinstance(clock.mark(), float)
    step = DefenseStep(_Flagger(_Tiny()), VotingConfig(k=1, n=1), torch.device("cpu"))
    for v in (0.9, 0.1, 0.9):
        r = step.step(torch.full((1, 3, 8, 8), v))
        assert r.timings is None and set(r.stages) >= {"backbone", "defense", "vote", "second_pass", "postprocess"}
        assert all(isinstance(ms, float) and ms >= 0 for ms in r.stages.values())
    assert no_sync == []


def test_cuda_clock_records_events_per_stage_without_synchronising(no_sync):
    _FakeEvent.made = 0
    clock = Clock(torch.device("cpu"), event=_FakeEvent)        # the CUDA code path, on any machine
    assert clock.events and isinstance(clock.mark(), _FakeEvent) and isinstance(clock.mark(host=True), float)
    step = DefenseStep(_Flagger(_Tiny()), VotingConfig(k=1, n=1), torch.device("cpu"), clock=clock)
    made = _FakeEvent.made
    r = step.step(torch.full((1, 3, 8, 8), 0.9))
    # backbone, detector (-> defense), second_pass, postprocess: two events each; the vote is host-timed
    assert _FakeEvent.made - made == 8
    assert no_sync == [] and r.stages == {} and isinstance(r.timings, Timings)   # nothing read yet
    stages = r.resolve_stages()                                  # what the sink thread does
    assert set(stages) == {"backbone", "defense", "vote", "second_pass", "postprocess"}
    assert all(ms >= 0 for ms in stages.values()) and r.timings is None
    assert no_sync == []


def test_cuda_clock_is_chosen_for_a_cuda_device():
    clock = Clock(torch.device("cuda"))         # constructing it touches no device
    assert clock.events


def test_no_device_synchronize_in_the_live_package():
    for f in LIVE.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"cuda\.synchronize\s*\(", text), f"{f} synchronises the device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the real event clock "
                    "(the same path runs on CPU with stand-in events above); benchmarks/gpu_check.sh runs it")
def test_real_cuda_step_uses_events_and_no_synchronize(no_sync):
    dev = torch.device("cuda")
    step = DefenseStep(_Flagger(_Tiny().to(dev)), VotingConfig(k=1, n=1), dev)
    r = step.step(torch.full((1, 3, 64, 64), 0.9, device=dev))
    assert r.timings is not None and no_sync == []
    assert r.resolve_stages()["second_pass"] >= 0 and r.label.shape == (64, 64)


def test_batched_step_matches_one_step_per_stream():
    cfg = VotingConfig(k=2, n=3, m=2)
    seq = {0: [0.9, 0.9, 0.1, 0.9], 1: [0.1, 0.1, 0.9, 0.9]}
    singles = {s: DefenseStep(_Flagger(_Tiny()), cfg, torch.device("cpu")) for s in seq}
    batched = DefenseStep(_Flagger(_Tiny()), cfg, torch.device("cpu"))
    voters = [batched.new_voter() for _ in seq]
    for t in range(4):
        x = torch.cat([torch.full((1, 3, 8, 8), seq[s][t]) for s in seq])
        rows = batched.step_batch(x, voters)
        for s, row in zip(seq, rows):
            one = singles[s].step(x[s:s + 1])
            assert (row.flagged, row.alarm, row.raised, row.carried, row.propagated, row.second_pass) == \
                   (one.flagged, one.alarm, one.raised, one.carried, one.propagated, one.second_pass), (s, t)
            assert (row.label == one.label).all() and abs(row.score - one.score) < 1e-6
            assert (row.masked is None) == (one.masked is None)
    assert voters[0].alarm and voters[1].alarm
