"""The real-time pipeline: decode -> preprocess -> backbone with taps -> defense -> temporal voting ->
masked second pass (only when needed) -> postprocess -> sinks.

Threads (stages overlap): a reader decodes frames, a preprocessor resizes/uploads them (on CUDA
through its own stream with pinned memory, so the copy overlaps the previous frame's compute), the
calling thread runs the model and the defense, and a sink thread renders/encodes/logs. Queues
between them are bounded: for live sources (cameras, streams, ``--realtime`` replays) they keep only
the newest frame and count drops; for replays they block, so every frame is processed exactly once.
Per-stage times are recorded for every frame (CUDA stages are synchronised to be measurable).
"""
from __future__ import annotations

import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import cv2
import numpy as np
import torch

from realtime.defenses.zmask import validate_input
from realtime.sinks.boxes import Boxes, to_boxes
from realtime.sources import Frame, Source, SourceDied, SourceError, make_queue
from realtime.voting import TemporalVoter, VotingConfig


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
class StepResult:
    """What the compute stage decided for one frame (masks are HxW bool at model resolution).

    The output is ``label`` (segmenters: HxW class map) or ``boxes`` (detectors); neither is set on
    an unsafe frame."""
    label: Optional[np.ndarray]
    masked: Optional[np.ndarray] = None
    score: Optional[float] = None
    flagged: bool = False
    carried: bool = False
    propagated: bool = False
    second_pass: bool = False
    raw_flagged: Optional[bool] = None
    alarm: bool = False
    raised: bool = False
    cleared: bool = False
    unsafe: bool = False
    error: Optional[str] = None
    stages: Dict[str, float] = field(default_factory=dict)
    boxes: Optional[Boxes] = None


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


class Clock:
    """perf_counter in ms, synchronising CUDA first so a stage's time is its own."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"

    def __call__(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter() * 1000.0


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


def to_label(logits: Any) -> np.ndarray:
    """HxW int class map from (1,C,H,W) logits (or a dict/tuple whose first tensor they are)."""
    if isinstance(logits, dict):
        logits = next(iter(logits.values()))
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return logits.argmax(1)[0].to("cpu", torch.uint8).numpy()


def decode(output: Any, task: str = "segmentation") -> Dict[str, Any]:
    """The frame's output as StepResult fields: ``label`` for segmenters, ``boxes`` for detectors
    (``realtime.models.registry.model_task``), so every step handles both tasks in one place."""
    return {"label": None, "boxes": to_boxes(output)} if task == "detection" else {"label": to_label(output)}


class PlainEngine:
    """``--defense none``: the backbone alone (no score, no alarm); ``model`` is a module or ``engine.plain``."""

    def __init__(self, model: Callable[[torch.Tensor], Any], device: torch.device,
                 task: str = "segmentation") -> None:
        self.model, self.clock, self.task = model, Clock(device), task

    @torch.inference_mode()
    def step(self, x: torch.Tensor) -> StepResult:
        t0 = self.clock()
        out = self.model(x)
        t1 = self.clock()
        res = decode(out, self.task)
        return StepResult(**res, stages={"backbone": t1 - t0, "postprocess": self.clock() - t1})


class ZMaskEngine:
    """Z-Mask with voting and mask propagation; a defense failure follows the fail-open/closed policy.

    Fail-open (default): the frame's segmentation comes from a plain, UNdefended pass and the event
    carries the error. Fail-closed (``--fail-closed``): the frame is marked unsafe and no
    segmentation is emitted for it (the video shows an empty panel).
    """

    def __init__(self, zm: Any, voting: VotingConfig, device: torch.device, fail_closed: bool = False,
                 audit: bool = False, task: str = "segmentation") -> None:
        self.zm, self.voter, self.task = zm, TemporalVoter(voting), task
        self.clock, self.fail_closed, self.audit = Clock(device), fail_closed, audit

    def _first_pass(self, x: torch.Tensor, st: Dict[str, float]) -> Tuple[Any, bool, torch.Tensor, float]:
        """Backbone with taps, then ZMask.detect, timed apart: (output, flagged, masked region (1,1,H,W), d)."""
        zm = self.zm
        validate_input(x, zm.cfg.check_finite)
        t0 = self.clock()
        out, taps = zm.taps(x)
        t1 = self.clock()
        det = zm.detect(taps, (x.shape[-2], x.shape[-1]))
        st["backbone"] = st.get("backbone", 0.0) + t1 - t0
        st["defense"] = st.get("defense", 0.0) + self.clock() - t1
        return out, bool(det.flagged[0]), 1.0 - det.mask, float(det.score[0])

    @torch.inference_mode()
    def step(self, x: torch.Tensor) -> StepResult:
        st: Dict[str, float] = {}
        try:
            return self._step(x, st)
        except Exception as exc:  # the policy decides what a failed defense means for this frame
            return self._failed(x, st, exc)

    def _step(self, x: torch.Tensor, st: Dict[str, float]) -> StepResult:
        zm = self.zm
        prop = self.voter.propagated()
        x1 = zm.shield(x, 1.0 - prop) if prop is not None else x
        out, flagged, fresh, score = self._first_pass(x1, st)
        raw_flagged = None
        if self.audit and prop is not None:
            aud: Dict[str, float] = {}
            raw_flagged = self._first_pass(x, aud)[1]
        t0 = self.clock()
        carried = prop is not None and not flagged
        vs = self.voter.update(flagged, fresh if flagged else None, carried)
        t1 = self.clock()
        st["vote"] = t1 - t0
        masked = None
        if flagged:
            masked = torch.maximum(fresh, prop) if prop is not None else fresh
            out = zm.taps.plain(zm.shield(x, 1.0 - masked))
        elif prop is not None:
            masked = prop
        t2 = self.clock()
        st["second_pass"] = t2 - t1
        res = decode(out, self.task)
        m = masked[0, 0].to("cpu").numpy() > 0.5 if masked is not None else None
        st["postprocess"] = self.clock() - t2
        return StepResult(**res, masked=m, score=score, flagged=flagged, carried=carried,
                          propagated=prop is not None, second_pass=flagged, raw_flagged=raw_flagged,
                          alarm=vs.alarm, raised=vs.raised, cleared=vs.cleared, stages=st)

    def _failed(self, x: torch.Tensor, st: Dict[str, float], exc: Exception) -> StepResult:
        msg = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        alarm = self.voter.alarm
        if self.fail_closed:
            return StepResult(label=None, unsafe=True, error=msg, alarm=alarm, stages=st)
        try:
            t0 = self.clock()
            res = decode(self.zm.taps.plain(x), self.task)
            st["backbone"] = st.get("backbone", 0.0) + self.clock() - t0
            return StepResult(**res, error=msg, alarm=alarm, stages=st)
        except Exception as exc2:  # not even the plain model runs: nothing trustworthy to emit
            return StepResult(label=None, unsafe=True, error=f"{msg}; plain pass: {exc2}"[:300], alarm=alarm,
                              stages=st)


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


def run_pipeline(source: Source, engine: Any, on_result: Callable[[Work, StepResult], None],
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
        except SourceError as exc:
            info.source_error, info.source_died = str(exc), isinstance(exc, SourceDied) or info.read > 0
        except Exception as exc:  # any decoder failure ends the run cleanly with what was processed
            info.source_error, info.source_died = f"source failed: {type(exc).__name__}: {exc}", info.read > 0
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
        while True:
            item = q_out.get()
            if item is None:
                break
            if info.sink_error is None:
                try:
                    on_result(*item)
                except Exception as exc:  # keep draining so the compute thread never blocks
                    info.sink_error = f"{type(exc).__name__}: {exc}"
                    stop.set()
        sink_done.set()

    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (reader, preprocessor, sinker)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    try:
        while not should_stop():
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
                break
    except KeyboardInterrupt:
        info.interrupted = True
    previous = _ignore_sigint()
    try:
        stop.set()
        q_out.put(None)
        sink_done.wait()
        threads[0].join(timeout=2.0)
    finally:
        _restore_sigint(previous)
    info.wall_s = time.perf_counter() - t_start
    info.dropped = q_in.dropped + q_pre.dropped
    return info


def _ignore_sigint() -> Any:
    """While the outputs are finalised a second Ctrl-C must not cut the file short."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    return None


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
