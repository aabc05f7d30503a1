"""Several sources through one defended model: one reader thread and one alarm state per stream, the
frames of all streams batched into one forward.

``python -m realtime.run --source A --source B`` (or ``--source cams.streams``, a text file with one
source per line; blank lines and ``#`` comments are skipped) runs here. Per stream: a reader thread
decodes and resizes its frames into its own queue (newest frame wins for live streams, drops counted;
frame-exact for replays) and a ``TemporalVoter`` keeps its alarm and propagation ring. The compute
thread takes one frame from every stream that still runs and calls ``DefenseStep.step_batch`` once
(batch = the streams with a frame); a live stream with no frame yet is waited for at most
``push_timeout`` s after the first frame of the batch arrived, so a slow camera never holds back the
others (replays are always waited for: every frame is processed exactly once). The uint8 frames of a
batch go to the device together (on CUDA through pinned memory, non-blocking). Results go to one
sink thread, as ``(stream index, Work, StepResult)``.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import cv2
import numpy as np
import torch

from realtime.core import signals
from realtime.core.errors import UsageError

from .pipeline import PipelineConfig, RunInfo, Work, _put, record_source_failure, sink_loop
from .sources import Source, make_queue
from .step import DefenseStep, StepResult

STREAMS_SUFFIX = ".streams"


def expand_sources(specs: Sequence[str]) -> List[str]:
    """The sources of a run: each spec as given, a ``.streams`` file replaced by its lines."""
    out: List[str] = []
    for spec in specs:
        if spec.lower().endswith(STREAMS_SUFFIX):
            p = Path(spec)
            if not p.is_file():
                raise UsageError(f"--source {spec}: no such streams file (one source per line)")
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
            found = [ln for ln in lines if ln and not ln.startswith("#")]
            if not found:
                raise UsageError(f"--source {spec}: the streams file lists no source")
            out += found
        else:
            out.append(spec)
    return out


@dataclass(frozen=True)
class StreamsConfig:
    """How the batch waits for live streams."""
    push_timeout: float = 0.05     # s a live stream's frame is waited for once the batch has one frame


@dataclass
class Stream:
    """One source's reader side and its alarm state."""
    index: int
    source: Source
    voter: Any
    live: bool
    q: Any = None
    info: RunInfo = field(default_factory=RunInfo)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None
    ended: bool = False
    pending: Optional[Work] = None


def resize(image: np.ndarray, imgsz: Sequence[int]) -> np.ndarray:
    """``image`` at the model size (INTER_AREA down, INTER_LINEAR up), as ``pipeline.preprocess``."""
    if image.shape[:2] == tuple(imgsz):
        return np.ascontiguousarray(image)
    h, w = imgsz
    down = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)


def batch_input(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """(N,H,W,3) uint8 frames -> (N,3,H,W) float in [0,1] on ``device``: one (pinned, non-blocking) copy."""
    t = torch.from_numpy(np.stack(images))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def _reader(s: Stream, cfg: PipelineConfig, arrived: threading.Event, stop: threading.Event) -> None:
    it = iter(s.source)
    info = s.info
    t_wall = ts0 = None
    halt = lambda: stop.is_set() or s.stop.is_set()      # noqa: E731
    try:
        while not halt():
            t0 = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            if cfg.realtime and not s.source.live:
                if t_wall is None:
                    t_wall, ts0 = t1, frame.timestamp
                time.sleep(max(0.0, (frame.timestamp - ts0) - (time.perf_counter() - t_wall)))
                t1 = time.perf_counter()
            info.read += 1
            w = Work(frame, t1, (t1 - t0) * 1000.0 if not cfg.realtime else 0.0)
            w.rgb = resize(frame.image, cfg.imgsz)
            w.preprocess_ms = (time.perf_counter() - t1) * 1000.0
            ok = _put(s.q, w, s.stop)
            arrived.set()
            info.dropped = s.q.dropped
            if not ok:
                break
    except Exception as exc:  # any decoder failure ends this stream cleanly with what was processed
        record_source_failure(info, exc)
    finally:
        _put(s.q, None, s.stop)
        arrived.set()


def _gather(active: List[Stream], arrived: threading.Event, stop: threading.Event, push_timeout: float
            ) -> List[Stream]:
    """The streams that contribute a frame (``pending``) to the next batch; marks ended streams."""
    t_first = None
    while not stop.is_set():
        arrived.clear()
        for s in active:
            if s.pending is None and not s.ended:
                try:
                    item = s.q.get(timeout=0)
                except queue.Empty:
                    continue
                if item is None:
                    s.ended = True
                else:
                    s.pending = item
                    t_first = t_first or time.perf_counter()
        waiting = [s for s in active if s.pending is None and not s.ended]
        ready = [s for s in active if s.pending is not None]
        if not waiting:
            return ready
        left = None
        if ready and all(s.live for s in waiting):
            left = push_timeout - (time.perf_counter() - t_first)
            if left <= 0:
                return ready
        arrived.wait(timeout=min(0.1, left) if left is not None else 0.1)
    return []


def run_streams(sources: Sequence[Source], step: DefenseStep,
                on_result: Callable[[int, Work, StepResult], None], cfg: PipelineConfig, device: torch.device,
                scfg: StreamsConfig = StreamsConfig(), should_stop: Callable[[], bool] = lambda: False,
                info: Optional[RunInfo] = None) -> List[Stream]:
    """Run every source through ``step`` in batches; ``on_result`` runs on the sink thread.

    ``cfg.imgsz`` must be set (one batch, one size). ``cfg.max_frames`` counts per stream. ``info``
    (optional) collects the run-level fields: wall time, interruption, sink error, batches in
    ``processed``. Returns the streams, each with its own ``RunInfo``."""
    if cfg.imgsz is None:
        raise ValueError("a multi-stream run needs a fixed model input size")
    info = info if info is not None else RunInfo()
    streams = []
    for i, src in enumerate(sources):
        live = src.live or cfg.realtime
        s = Stream(i, src, step.new_voter(), live)
        s.q = make_queue(live, cfg.live_queue if live else cfg.replay_queue)
        streams.append(s)
    stop, arrived = threading.Event(), threading.Event()
    q_out: "queue.Queue[Any]" = queue.Queue(4 * max(1, len(streams)))
    sink_done = threading.Event()

    def sinker() -> None:
        sink_loop(q_out, on_result, info, stop, sink_done)

    for s in streams:
        s.thread = threading.Thread(target=_reader, args=(s, cfg, arrived, stop), name=f"reader{s.index}",
                                    daemon=True)
        s.thread.start()
    sink = threading.Thread(target=sinker, name="sinker", daemon=True)
    sink.start()
    t_start = time.perf_counter()
    try:
        while True:
            if should_stop():
                info.stopped = "quit requested"
                break
            active = [s for s in streams if not s.ended]
            if not active:
                break
            batch = _gather(active, arrived, stop, scfg.push_timeout)
            if not batch:
                continue
            t0 = time.perf_counter()
            x = batch_input([s.pending.rgb for s in batch], device)
            upload_ms = (time.perf_counter() - t0) * 1000.0 / len(batch)
            results = step.step_batch(x, [s.voter for s in batch])
            info.processed += 1
            for s, r in zip(batch, results):
                w, s.pending = s.pending, None
                r.stages = {"decode": w.decode_ms, "preprocess": w.preprocess_ms + upload_ms, **r.stages}
                q_out.put((s.index, w, r))
                s.info.processed += 1
                if cfg.max_frames is not None and s.info.processed >= cfg.max_frames:
                    s.info.stopped, s.ended = "max-frames reached", True
                    s.stop.set()
                    s.source.interrupt()
    except KeyboardInterrupt as exc:
        info.interrupted, info.signal = True, signals.signum_of(exc)
        info.stopped = signals.signal_name(info.signal)
    with signals.deferred():          # a second signal must not cut the outputs short
        stop.set()
        for s in streams:
            s.stop.set()
            s.source.interrupt()
        q_out.put(None)
        sink_done.wait()
        for s in streams:
            s.thread.join(timeout=2.0)
    info.wall_s = time.perf_counter() - t_start
    for s in streams:
        si = s.info
        si.reader_alive, si.wall_s, si.dropped = s.thread.is_alive(), info.wall_s, s.q.dropped
        si.interrupted, si.signal, si.sink_error = info.interrupted, info.signal, info.sink_error
        if info.interrupted or info.stopped == "quit requested":
            si.stopped = info.stopped
        elif si.source_error:
            si.stopped = "source died" if si.source_died else "source error"
        if info.sink_error:
            si.stopped = "writing outputs failed"
    if info.sink_error:
        info.stopped = "writing outputs failed"
    return streams


__all__ = ["STREAMS_SUFFIX", "Stream", "StreamsConfig", "batch_input", "expand_sources", "run_streams"]
