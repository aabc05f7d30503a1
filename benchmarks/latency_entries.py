"""What the latency benchmark times: a defense on a batch, or the live pipeline's temporal path.

Every entry does the whole frame: ``preprocess`` (host uint8 NHWC -> float NCHW in [0,1] on the
device), the defense's own stages, and ``postprocess`` (argmax -> uint8 label map on the host). A
defense's own ``preprocess``/``postprocess`` stages are recorded as ``defense_preprocess`` /
``defense_postprocess`` so they are not mixed with the harness's.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional

import numpy as np
import torch

from benchmarks.timing import Entry, FrameTimer, Outcome
from realtime.core.labels import label_map
from realtime.defenses.base import Defense

Batches = Dict[str, List[np.ndarray]]        # kind -> list of (B,H,W,3) uint8 host batches
RENAMED = {"preprocess": "defense_preprocess", "postprocess": "defense_postprocess"}
TEMPORAL_STAGES = {"defense": "detect"}     # DefenseStep's stage names -> ours


def stack_batches(frames: List[np.ndarray], batch: int, count: int) -> List[np.ndarray]:
    """``count`` batches of ``batch`` frames each, cycling through ``frames`` in order."""
    if not frames:
        raise ValueError("no frames to batch")
    return [np.stack([frames[(i * batch + j) % len(frames)] for j in range(batch)]) for i in range(count)]


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B,H,W,3) uint8 -> contiguous (B,3,H,W) float32 in [0,1] on ``device``.

    On CUDA the uint8 frames go through pinned memory with a non-blocking copy, and the layout change
    and conversion run on the GPU in one kernel."""
    t = torch.from_numpy(np.ascontiguousarray(batch))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def first_tensor(out: Any) -> torch.Tensor:
    """The logits in a model output (a tensor, or the first tensor of a dict / tuple)."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")
    return out


def labels(out: Any) -> np.ndarray:
    """(B,H,W) uint8 class map on the host."""
    return label_map(first_tensor(out)).to("cpu").numpy()


def grad_mode(defense: Defense) -> ContextManager:
    """inference_mode for forward-only defenses; gradients on for the ones that run backward passes."""
    return torch.enable_grad() if getattr(defense, "needs_grad", False) else torch.inference_mode()


def defense_entry(name: str, defense: Defense, batches: Batches, device: torch.device,
                  precision_ctx: Callable[[], ContextManager] = contextlib.nullcontext) -> Entry:
    """An entry running ``defense`` on batch ``index % len`` of each kind."""

    def run(kind: str, index: int, timer: FrameTimer) -> Outcome:
        pool = batches[kind]
        with timer("preprocess"):
            x = to_input(pool[index % len(pool)], device)
        inner = lambda stage: timer(RENAMED.get(stage, stage))   # noqa: E731 - a tiny adapter
        with grad_mode(defense), precision_ctx():
            res = defense(x, inner)
        with timer("postprocess"):
            labels(res.output)
        flagged = None if res.flagged is None else bool(res.flagged.detach().any().item())
        return Outcome(flagged=flagged)

    return Entry(name, run, tuple(batches))


class TemporalStream:
    """The live pipeline's ``DefenseStep`` (voting + mask propagation) walking one stream of frames.

    It ignores the round index and keeps its own position, so warm-up and timed rounds form one
    continuous video (frames cycle when the pool ends). Stages are the pipeline's own; ``propagate``
    is the rest of its step (mask union + dilation, masking before the pass, input checks)."""

    def __init__(self, engine: Any, frames: List[np.ndarray], device: torch.device) -> None:
        self.engine, self.frames, self.device = engine, frames, device
        self.pos = 0

    def __call__(self, timer: FrameTimer) -> Outcome:
        frame = self.frames[self.pos % len(self.frames)]
        self.pos += 1
        with timer("preprocess"):
            x = to_input(frame[None], self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        res = self.engine.step(x)
        if cuda:
            torch.cuda.synchronize(self.device)
        step_ms = (time.perf_counter() - t0) * 1000.0
        if res.error is not None:
            raise RuntimeError(f"temporal path failed: {res.error}")
        for stage, ms in res.resolve_stages().items():
            timer.add(TEMPORAL_STAGES.get(stage, stage), ms)
        # what the pipeline does not time itself: building the propagated mask (ring union + dilation),
        # applying it before the pass, and input validation
        timer.add("propagate", max(0.0, step_ms - sum(res.stages.values())))
        tag = "second_pass" if res.second_pass else ("reuse" if res.propagated else "plain")
        return Outcome(flagged=bool(res.flagged), tag=tag)


def temporal_entry(name: str, make_engine: Callable[[], Any], frames: Dict[str, List[np.ndarray]],
                   device: torch.device) -> Entry:
    """One independent ``DefenseStep`` per frame kind (its own alarm state), batch 1."""
    streams = {kind: TemporalStream(make_engine(), fs, device) for kind, fs in frames.items()}

    def run(kind: str, _index: int, timer: FrameTimer) -> Outcome:
        return streams[kind](timer)

    return Entry(name, run, tuple(frames))


class MultiStream:
    """``n`` streams through one ``DefenseStep``, one voter (alarm state, propagation ring) per stream.

    ``batched``: each round stacks one frame of every stream and makes ONE ``step_batch`` call (what
    ``realtime.run --source A --source B`` does); otherwise it makes ``n`` one-frame calls (n x one
    stream). A round is ``n`` frames either way; streams start at different frames of the pool."""

    def __init__(self, engine: Any, frames: List[np.ndarray], device: torch.device, n: int, batched: bool) -> None:
        self.engine, self.frames, self.device, self.n, self.batched = engine, frames, device, n, batched
        self.voters = [engine.new_voter() for _ in range(n)]
        self.pos = 0

    def __call__(self, timer: FrameTimer) -> Outcome:
        L = len(self.frames)
        imgs = [self.frames[(self.pos + j * max(1, L // self.n)) % L] for j in range(self.n)]
        self.pos += 1
        if self.batched:
            with timer("preprocess"):
                x = to_input(np.stack(imgs), self.device)
            rows = self.engine.step_batch(x, self.voters)
            timed = rows[:1]                         # the rows of one call share its stage times
        else:
            rows = []
            for img, voter in zip(imgs, self.voters):
                with timer("preprocess"):
                    x = to_input(img[None], self.device)
                rows += self.engine.step_batch(x, [voter])
            timed = rows
        for r in rows:
            if r.error is not None:
                raise RuntimeError(f"multi-stream path failed: {r.error}")
        for r in timed:
            for stage, ms in r.resolve_stages().items():
                timer.add(TEMPORAL_STAGES.get(stage, stage), ms)
        return Outcome(flagged=any(r.flagged for r in rows))


def multistream_entries(name: str, make_engine: Callable[[], Any], frames: Dict[str, List[np.ndarray]],
                        device: torch.device, n: int) -> List[Entry]:
    """``<name> xN batched`` and ``<name> xN serial``: the same N streams, one batched call vs N calls."""
    entries = []
    for batched in (True, False):
        streams = {kind: MultiStream(make_engine(), fs, device, n, batched) for kind, fs in frames.items()}
        entries.append(Entry(f"{name} x{n} {'batched' if batched else 'serial'}",
                             lambda kind, _i, timer, st=streams: st[kind](timer), tuple(frames)))
    return entries


def probe(entry: Entry) -> Optional[str]:
    """Run ``entry`` once per kind, untimed; the error message if it fails (then it is left out)."""
    try:
        for kind in entry.kinds:
            entry.run(kind, 0, FrameTimer())
    except Exception as exc:   # a defense that cannot run here is reported, not fatal for the suite
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    return None


__all__ = ["Batches", "MultiStream", "TemporalStream", "multistream_entries", "defense_entry", "first_tensor", "grad_mode", "labels", "probe",
           "stack_batches", "temporal_entry", "to_input"]
