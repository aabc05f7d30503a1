"""One live run end to end: ``run(RunConfig) -> (exit status, summary)``, and the sinks it writes to.

``python -m realtime.run`` only turns its flags into a ``RunConfig`` and calls ``run``; anything else
(a service, a notebook) can do the same. Outputs: an annotated video, JSON-lines events
(``realtime.live.schema``), a summary JSON, an optional window and a progress display.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import av
import cv2
import numpy as np
import torch
from tqdm import tqdm

from realtime.core import signals
from realtime.core.cli import parse_hw
from realtime.core.devices import describe, pick_device
from realtime.core.errors import UsageError, one_line
from realtime.core.memory import steady_heap

from .build import REPO, RunConfig, build, calibration_path, check_imgsz, weights_arg
from .paths import check_outputs, input_paths
from .paths import output_paths as paths_for
from .multistream import expand_sources
from .pipeline import PipelineConfig, RunInfo, Work, run_pipeline
from .report import print_summary, run_status, write_summary
from .schema import AlarmEvent, FrameEvent, ReconnectEvent, RunHeader
from .sinks.boxes import box_records
from .sinks.display import open_display
from .sinks.events import EventWriter, RunStats, iou, mask_box
from .sinks.video import VideoWriter, annotate
from .sources import Source, SourceOptions, open_source, source_kind
from .step import StepResult
from .voting import VotingConfig


def parse_imgsz(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        return check_imgsz(parse_hw(text, minimum=32), "--imgsz")
    except ValueError as exc:
        raise UsageError(f"--imgsz: {exc}") from None


def _positive(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a positive number of {'frames per second' if flag == '--fps' else 'seconds'}, "
                         f"got {value}")


def check_config(cfg: RunConfig) -> None:
    """Every argument problem found without opening anything (UsageError, exit status 2)."""
    if cfg.max_frames is not None and cfg.max_frames < 1:
        raise UsageError("--max-frames must be >= 1")
    if not 0.0 <= cfg.box_threshold <= 1.0:
        raise UsageError("--box-threshold must be in [0, 1]")
    if cfg.threads is not None and cfg.threads < 1:
        raise UsageError("--threads must be >= 1")
    _positive(cfg.fps, "--fps")
    _positive(cfg.timeout, "--timeout")
    if cfg.reconnect is not None and cfg.reconnect < 0:
        raise UsageError(f"--reconnect must be >= 0 attempts, got {cfg.reconnect}")
    if cfg.threshold is not None and not math.isfinite(cfg.threshold):
        raise UsageError(f"--threshold must be a finite number, got {cfg.threshold}")


class Outputs:
    """The sinks: annotated video, events, summary statistics, optional window, progress display.

    Opening them is the last check before the first frame: an output that cannot be created or
    written (a bad folder, a full device) is a UsageError, with whatever was opened closed again."""

    def __init__(self, cfg: RunConfig, source: Source, paths: Dict[str, Optional[Path]],
                 defended: bool, live: bool, total: Optional[int],
                 class_names: Optional[Sequence[str]] = None, stream: Optional[int] = None) -> None:
        fps = source.fps or cfg.fps
        self.stream = stream          # multi-stream runs: the source's index, in every event
        self.video: Optional[VideoWriter] = None
        self.events: Optional[EventWriter] = None
        self.display = None
        self.bar = None
        self.source = source
        try:
            if paths["video"]:
                self.video = VideoWriter(paths["video"], fps=min(max(fps, 1.0), 60.0))
            if paths["events"]:
                self.events = EventWriter(paths["events"])
                self.events.write(RunHeader(cfg.source, cfg.model, cfg.defense, stream=stream).to_dict())
        except (OSError, ValueError, av.FFmpegError) as exc:
            flag = "--events" if self.video is not None or not paths["video"] else "--output"
            self.close()
            raise UsageError(f"{flag} {paths['events' if flag == '--events' else 'video']} cannot be written: "
                             f"{one_line(exc)}") from None
        self.stats = RunStats()
        self.reconnects: List[Dict[str, Any]] = []
        self.defended, self.live, self.name = defended, live, source.name
        self.display = open_display(f"realtime: {source.name}", _notice) if cfg.show else None
        show_bar = not cfg.quiet and not live
        self.bar = tqdm(total=total, unit="frame", desc=source.name, disable=not show_bar, file=sys.stderr)
        self.fps_line = live and not cfg.quiet
        self.done: Deque[float] = deque(maxlen=30)
        self.t_line = 0.0
        self.dropped = lambda: 0
        # a detector's label names (None for a segmenter) and the score its boxes must reach to be shown
        self.class_names = tuple(class_names) if class_names is not None else None
        self.box_threshold = cfg.box_threshold

    def source_events(self) -> None:
        """Record the source's reconnects (live sources) as they happen."""
        for e in self.source.drain_events():
            rec = ReconnectEvent(e["frame"], e["ok"], e["gap_s"], e["attempts"], e.get("error"),
                                 stream=self.stream).to_dict()
            self.reconnects.append(rec)
            if self.events is not None:
                self.events.write(rec)

    def quit_requested(self) -> bool:
        return self.display is not None and self.display.quit_requested

    def handle(self, w: Work, r: StepResult) -> None:
        self.source_events()
        t0 = time.perf_counter()
        self.done.append(t0)
        fps = (len(self.done) - 1) / (self.done[-1] - self.done[0]) if len(self.done) > 1 else 0.0
        state = "unsafe" if r.unsafe else ("alarm" if r.alarm else ("clear" if self.defended else "off"))
        banner = {"unsafe": "UNSAFE: defense failed, no output", "alarm": "ALARM: adversarial patch",
                  "clear": "no patch detected", "off": "undefended (--defense none)"}[state]
        score = f"d={r.score:.3f}  " if r.score is not None else ""
        info = f"#{w.frame.index}  {score}{fps:4.1f} FPS"
        gt = _resize_mask(w.frame.gt_mask, w.rgb.shape[:2]) if w.frame.gt_mask is not None else None
        shown = r.boxes.above(self.box_threshold) if r.boxes is not None else None
        if self.video is not None or self.display is not None:
            img = annotate(w.rgb, r.label, r.masked, gt, state, info, banner, shown, self.class_names or ())
            if self.video is not None:
                self.video.write(img)
            if self.display is not None:
                self.display.show(img)
        t1 = time.perf_counter()
        stages = {k: round(v, 2) for k, v in r.stages.items()}
        stages["sink"] = round((t1 - t0) * 1000.0, 2)
        ev = FrameEvent(
            frame=len(self.stats.records), source_frame=w.frame.index, timestamp=round(w.frame.timestamp, 4),
            score=None if r.score is None else round(r.score, 5), flagged=r.flagged, alarm=r.alarm,
            alarm_raised=r.raised, mask_box=mask_box(r.masked),
            mask_frac=round(float(r.masked.mean()), 5) if r.masked is not None else 0.0,
            second_pass=r.second_pass, propagated=r.propagated, carried=r.carried, unsafe=r.unsafe, error=r.error,
            stages_ms=stages, compute_ms=round(sum(v for k, v in stages.items() if k not in ("decode", "sink")), 2),
            latency_ms=round((time.perf_counter() - w.t_read) * 1000.0, 2), raw_flagged=r.raw_flagged,
            # a detector: its boxes (None on an unsafe frame: no output)
            has_boxes=self.class_names is not None,
            boxes=box_records(shown, self.class_names) if (shown is not None and self.class_names is not None) else None,
            stream=self.stream, evidence=None if r.evidence is None else round(r.evidence, 4))
        if gt is not None:
            c = iou(r.masked, gt)
            ev.gt = {"gt_patch": bool(gt.any()), "gt_inter": c["inter"], "gt_union": c["union"],
                     "gt_iou": round(c["inter"] / c["union"], 4) if c["union"] else None}
        rec = ev.to_dict()
        if self.events is not None:
            self.events.write(rec)
            if r.raised or r.cleared:
                self.events.write(AlarmEvent("on" if r.raised else "off", ev.frame, ev.timestamp,
                                              stream=self.stream).to_dict())
        self.stats.add(rec)
        self.bar.update(1)
        if self.fps_line and t1 - self.t_line > 0.5:
            self.t_line = t1
            sys.stderr.write(f"\r{self.name}: {fps:5.1f} FPS | frames {len(self.stats.records)} | "
                             f"dropped {self.dropped()} | alarm {'ON ' if r.alarm else 'off'}  ")
            sys.stderr.flush()

    def close(self) -> Optional[str]:
        """Finalise every sink (each one even if another fails); returns the first error, if any.
        A video with no frames is removed rather than left unplayable."""
        error = None
        if self.bar is not None:
            self.bar.close()
            if self.fps_line:
                sys.stderr.write("\n")
        if hasattr(self, "reconnects"):
            try:
                self.source_events()            # a last failed reconnect, say
            except Exception:  # noqa: BLE001  the events file may be what failed
                pass
        for sink in (self.video, self.events, self.display):
            if sink is None:
                continue
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001  report it, close the others
                error = error or f"closing {type(sink).__name__}: {one_line(exc)}"
        if self.video is not None and self.video.frames == 0:
            self.video.path.unlink(missing_ok=True)
        return error


def _resize_mask(mask: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    if mask.shape == hw:
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST) > 0


def _notice(msg: str) -> None:
    print(msg, file=sys.stderr)


def output_paths(cfg: RunConfig, source_name: str) -> Dict[str, Optional[Path]]:
    return paths_for(cfg, source_name, REPO)


def prepare(cfg: RunConfig) -> Tuple[torch.device, PipelineConfig, SourceOptions, str]:
    """What one- and multi-stream runs set up alike: checks, threads, heap policy, voting, device, the pipeline's
    config and the sources' options (and what the heap policy did, for the summary); a problem is a UsageError."""
    check_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    heap = steady_heap(not cfg.default_malloc)
    try:
        ev_n, ev_r = VotingConfig.parse_evidence(cfg.evidence)
        voting = VotingConfig.parse(cfg.vote, clear=cfg.clear, propagate=not cfg.no_propagate,
                                    mask_window=cfg.mask_window, dilate=cfg.dilate, motion=cfg.motion,
                                    evidence=ev_n, evidence_ratio=ev_r)
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    pcfg = PipelineConfig(voting=voting, fail_closed=cfg.fail_closed, max_frames=cfg.max_frames,
                          realtime=cfg.realtime, audit=cfg.audit, imgsz=parse_imgsz(cfg.imgsz))
    opts = SourceOptions(data=cfg.data, image_fps=cfg.fps, timeout=cfg.timeout, model=cfg.model, patch=cfg.patch,
                         reconnect=cfg.reconnect, patch_start=cfg.patch_start, patch_frames=cfg.patch_frames)
    return device, pcfg, opts, heap


def run(cfg: RunConfig) -> Tuple[int, Dict[str, Any]]:
    """A whole live run: build, stream, write the outputs and the summary; returns (exit status, summary).

    Bad arguments, sources, models, calibrations and outputs raise UsageError / SourceError before the
    first frame. A stop signal (``realtime.core.signals``) ends the run with every output finalised.
    Several sources (``cfg.sources``, or a ``.streams`` file) run as one batched multi-stream run
    (``realtime.live.multirun``)."""
    specs = expand_sources(cfg.sources or (cfg.source,))
    if len(specs) > 1:
        from .multirun import run_multi          # same package; it builds on this module's Outputs
        return run_multi(cfg, specs)
    if specs[0] != cfg.source or cfg.sources:
        cfg = dataclasses.replace(cfg, source=specs[0], sources=())
    device, pcfg, opts, heap = prepare(cfg)
    seen = signals.mark()
    source = open_source(cfg.source, opts)
    info = RunInfo()
    try:
        paths = output_paths(cfg, source.name)
        cal = calibration_path(cfg) if cfg.defense == "zmask" else None
        check_outputs(paths, input_paths(cfg, source, weights_arg(cfg.weights) if cfg.weights != "default"
                                         else None, cal))
        rt = build(cfg, device, pcfg)
        desc, imgsz = rt.description, rt.imgsz
        pcfg = dataclasses.replace(pcfg, imgsz=imgsz)
        live = source.live or cfg.realtime
        total = min(x for x in (source.length, cfg.max_frames) if x is not None) \
            if (source.length or cfg.max_frames) else None
        head = {"source": cfg.source, "kind": source_kind(cfg.source),
                **({"source_info": source.info} if getattr(source, "info", None) else {}),   # demo: which frames
                "model": cfg.model, **desc,
                "imgsz": list(imgsz), "device": describe(device),
                "heap": heap}
        out = Outputs(cfg, source, paths, cfg.defense != "none", live, total, desc.get("class_names"))
        out.dropped = lambda: info.dropped
        try:
            try:   # written now so an unwritable summary is found before the first frame
                write_summary(paths["summary"], {**head, "status": "running", "frames": 0})
            except OSError as exc:
                raise UsageError(f"--summary {paths['summary']} cannot be written: {one_line(exc)}") from None
            run_pipeline(source, rt.step, out.handle, pcfg, device, out.quit_requested, info)
        except KeyboardInterrupt as exc:          # a signal between opening the outputs and the first frame
            info.interrupted, info.signal = True, signals.signum_of(exc)
            info.stopped = signals.signal_name(info.signal)
        finally:
            with signals.deferred():
                close_error = out.close()
        info.sink_error = info.sink_error or close_error
    finally:
        with signals.deferred():
            if not info.reader_alive:            # never close a container another thread is still reading
                source.close()
    late = signals.since(seen)
    if late and not info.interrupted:            # a signal while the outputs were being finalised
        info.interrupted, info.signal, info.stopped = True, late[0], signals.signal_name(late[0])
    summary: Dict[str, Any] = {**head, **out.stats.summary(info.wall_s, info.read, info.dropped),
                               **({"box_threshold": cfg.box_threshold} if "task" in desc else {}),
                               "fail_closed": cfg.fail_closed, "stopped": info.stopped,
                               "interrupted": info.interrupted,
                               "signal": signals.signal_name(info.signal) if info.signal else None,
                               "source_error": info.source_error, "reconnects": out.reconnects,
                               "outputs": {k: str(v) if v else None for k, v in paths.items()}}
    summary["status"] = "interrupted" if info.interrupted else ("failed" if info.source_error or info.sink_error
                                                                  else "complete")
    if paths["video"] is not None and out.video is not None and out.video.frames == 0:
        summary["outputs"]["video"] = None
    with signals.deferred():
        try:
            write_summary(paths["summary"], summary)
        except OSError as exc:
            info.sink_error = info.sink_error or f"--summary {paths['summary']}: {one_line(exc)}"
        print_summary(summary)
    return run_status(info, summary, cfg.fail_closed), summary


__all__ = ["Outputs", "check_config", "output_paths", "print_summary", "run"]
