"""The real-time pipeline: decode -> preprocess -> backbone with taps -> defense -> temporal voting ->
masked second pass (only when needed) -> postprocess -> sinks.

Threads (stages overlap): a reader decodes frames, a preprocessor resizes/uploads them (on CUDA
through its own stream with pinned memory, so the copy overlaps the previous frame's compute), the
calling thread runs the model and the defense, and a sink thread renders/encodes/logs. Queues
between them are bounded: for live sources (cameras, streams, ``--realtime`` replays) they keep only
the newest frame and count drops; for replays they block, so every frame is processed exactly once.
Per-stage times are recorded for every frame (on CUDA with timing events, read on the sink thread:
the compute thread never synchronises the device at a stage boundary).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import cv2
import numpy as np
import torch

from realtime.core import signals

from .sources import Frame, Source, SourceDied, SourceError, make_queue
from .step import Step, StepResult
from .voting import VotingConfig


@dataclass(frozen=True)
class PipelineConfig:
    """Model input size, failure policy, voting, frame limit, pacing and measurement switches."""
    imgsz: Optional[Tuple[int, int]] = (360, 480)   # (H, W) the model runs at; None = source size
    fail_closed: bool = False
    voting: VotingConfig = field(default_factory=VotingConfig)
    max_frames: Optional[int] = None
    realtime: bool = False        # pace a replayed source at its own clock (then it is treated as live)
    audit: bool = False           # also analyse the UNmasked frame when propagation masked it (2x cost)
    live_queue: int = 1
    replay_queue: int = 2


@dataclass
class Work:
    """A frame travelling through the threads, with what each stage added."""
    frame: Frame
    t_read: float
    decode_ms: float
    rgb: Optional[np.ndarray] = None            # the frame at model resolution (for the sinks)
    x: Optional[torch.Tensor] = None
    ready: Any = None                           # CUDA event: upload finished
    preprocess_ms: float = 0.0


@dataclass
class RunInfo:
    """How the run went, for the summary and the exit code."""
    read: int = 0
    processed: int = 0
    dropped: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    source_error: Optional[str] = None
    source_died: bool = False
    sink_error: Optional[str] = None
    signal: Optional[int] = None      # the stop signal (SIGINT, SIGTERM, SIGHUP) when interrupted
    stopped: str = "end of source"    # why the run stopped, for the summary
    reader_alive: bool = False        # the reader was still blocked in the source when the run ended


def preprocess(image: np.ndarray, imgsz: Optional[Tuple[int, int]], device: torch.device,
               stream: Any = None) -> Tuple[np.ndarray, torch.Tensor, Any]:
    """Resize to the model size, then (1,3,H,W) float in [0,1] on ``device`` (+ a CUDA ready-event)."""
    if imgsz is not None and image.shape[:2] != tuple(imgsz):
        h, w = imgsz
        down = h * w < image.shape[0] * image.shape[1]
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if device.type != "cuda":
        return image, t.float().div_(255.0), None
    with torch.cuda.stream(stream):
        x = t.pin_memory().to(device, non_blocking=True).float().div_(255.0)
        ready = torch.cuda.Event()
        ready.record(stream)
    return image, x, ready


def _put(q: Any, item: Any, stop: threading.Event) -> bool:
    """Put unless the run is stopping (blocking queues re-check the stop flag every 0.1 s)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: Any, stop: threading.Event) -> Any:
    """Next item, or None once the run is stopping."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def record_source_failure(info: RunInfo, exc: Exception) -> None:
    """How a reader's exception ends its stream: the message, and whether the source died mid-stream
    (exit 3) rather than failing before its first frame (exit 2)."""
    if isinstance(exc, SourceError):
        info.source_error, info.source_died = str(exc), isinstance(exc, SourceDied) or info.read > 0
    else:
        info.source_error, info.source_died = f"source failed: {type(exc).__name__}: {exc}", info.read > 0


def sink_loop(q_out: "queue.Queue[Any]", on_result: Callable[..., None], info: RunInfo, stop: threading.Event,
              done: threading.Event) -> None:
    """The sink thread: ``on_result(*item)`` for every queued item until ``None``; the item's last element
    is its StepResult, whose CUDA stage events are read here, off the compute thread. A sink error is
    recorded once and stops the run, and the queue keeps draining so the compute thread never blocks."""
    while True:
        item = q_out.get()
        if item is None:
            break
        if info.sink_error is None:
            try:
                item[-1].resolve_stages()
                on_result(*item)
            except Exception as exc:
                info.sink_error = f"{type(exc).__name__}: {exc}"
                stop.set()
    done.set()


def run_pipeline(source: Source, engine: Step, on_result: Callable[[Work, StepResult], None],
                 cfg: PipelineConfig, device: torch.device,
                 should_stop: Callable[[], bool] = lambda: False, info: Optional[RunInfo] = None) -> RunInfo:
    """Run ``source`` through ``engine``; ``on_result`` (the sinks) runs on its own thread.

    Returns when the source ends, ``max_frames`` frames were processed, ``should_stop()`` turns
    true, or Ctrl-C; in every case the sink thread has consumed every processed frame first.
    ``info`` (optional) is updated while running, e.g. for a live drop counter.
    """
    info = info if info is not None else RunInfo()
    live = source.live or cfg.realtime
    size = cfg.live_queue if live else cfg.replay_queue
    q_in, q_pre = make_queue(live, size), make_queue(live, size)
    q_out: "queue.Queue[Any]" = queue.Queue(4)
    stop, sink_done = threading.Event(), threading.Event()
    upload = torch.cuda.Stream(device) if device.type == "cuda" else None

    def reader() -> None:
        it = iter(source)
        t_wall = ts0 = None
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                if cfg.realtime and not source.live:
                    if t_wall is None:
                        t_wall, ts0 = t1, frame.timestamp
                    time.sleep(max(0.0, (frame.timestamp - ts0) - (time.perf_counter() - t_wall)))
                    t1 = time.perf_counter()
                info.read += 1
                ok = _put(q_in, Work(frame, t1, (t1 - t0) * 1000.0 if not cfg.realtime else 0.0), stop)
                info.dropped = q_in.dropped + q_pre.dropped
                if not ok:
                    break
        except Exception as exc:  # any decoder failure ends the run cleanly with what was processed
            record_source_failure(info, exc)
        finally:
            _put(q_in, None, stop)

    def preprocessor() -> None:
        while True:
            w = _get(q_in, stop)
            if w is None:
                break
            t0 = time.perf_counter()
            w.rgb, w.x, w.ready = preprocess(w.frame.image, cfg.imgsz, device, upload)
            w.preprocess_ms = (time.perf_counter() - t0) * 1000.0
            if not _put(q_pre, w, stop):
                break
        _put(q_pre, None, stop)

    def sinker() -> None:
        sink_loop(q_out, on_result, info, stop, sink_done)

    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (reader, preprocessor, sinker)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    try:
        while True:
            if should_stop():
                info.stopped = "quit requested"
                break
            w = _get(q_pre, stop)
            if w is None:
                break
            if w.ready is not None:                       # uploaded on the side stream
                torch.cuda.current_stream(device).wait_event(w.ready)
                w.x.record_stream(torch.cuda.current_stream(device))
            res = engine.step(w.x)
            res.stages = {"decode": w.decode_ms, "preprocess": w.preprocess_ms, **res.stages}
            w.x = None
            q_out.put((w, res))
            info.processed += 1
            if cfg.max_frames is not None and info.processed >= cfg.max_frames:
                info.stopped = "max-frames reached"
                break
    except KeyboardInterrupt as exc:
        info.interrupted, info.signal = True, signals.signum_of(exc)
        info.stopped = signals.signal_name(info.signal)
    with signals.deferred():          # a second signal must not cut the outputs short
        stop.set()
        source.interrupt()
        q_out.put(None)
        sink_done.wait()
        threads[0].join(timeout=2.0)
    info.reader_alive = threads[0].is_alive()
    if info.source_error and not info.interrupted:
        info.stopped = "source died" if info.source_died else "source error"
    if info.sink_error:
        info.stopped = "writing outputs failed"
    info.wall_s = time.perf_counter() - t_start
    info.dropped = q_in.dropped + q_pre.dropped
    return info
