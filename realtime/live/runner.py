"""One live run end to end: ``run(RunConfig) -> (exit status, summary)``, and the sinks it writes to.

``python -m realtime.run`` only turns its flags into a ``RunConfig`` and calls ``run``; anything else
(a service, a notebook) can do the same. Outputs: an annotated video, JSON-lines events
(``realtime.live.schema``), a summary JSON, an optional window and a progress display.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from realtime.core.cli import parse_hw
from realtime.core.devices import describe, pick_device
from realtime.core.errors import UsageError

from .build import REPO, RunConfig, build
from .pipeline import PipelineConfig, RunInfo, Work, run_pipeline
from .schema import AlarmEvent, FrameEvent, RunHeader
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
        return parse_hw(text, minimum=32)
    except ValueError as exc:
        raise UsageError(f"--imgsz: {exc}") from None


class Outputs:
    """The sinks: annotated video, events, summary statistics, optional window, progress display."""

    def __init__(self, cfg: RunConfig, source: Source, paths: Dict[str, Optional[Path]],
                 defended: bool, live: bool, total: Optional[int],
                 class_names: Optional[Sequence[str]] = None) -> None:
        fps = source.fps or cfg.fps
        self.video = VideoWriter(paths["video"], fps=min(max(fps, 1.0), 60.0)) if paths["video"] else None
        self.events = EventWriter(paths["events"]) if paths["events"] else None
        if self.events is not None:
            self.events.write(RunHeader(cfg.source, cfg.model, cfg.defense).to_dict())
        self.stats = RunStats()
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

    def quit_requested(self) -> bool:
        return self.display is not None and self.display.quit_requested

    def handle(self, w: Work, r: StepResult) -> None:
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
            boxes=box_records(shown, self.class_names) if (shown is not None and self.class_names is not None) else None)
        if gt is not None:
            c = iou(r.masked, gt)
            ev.gt = {"gt_patch": bool(gt.any()), "gt_inter": c["inter"], "gt_union": c["union"],
                     "gt_iou": round(c["inter"] / c["union"], 4) if c["union"] else None}
        rec = ev.to_dict()
        if self.events is not None:
            self.events.write(rec)
            if r.raised or r.cleared:
                self.events.write(AlarmEvent("on" if r.raised else "off", ev.frame, ev.timestamp).to_dict())
        self.stats.add(rec)
        self.bar.update(1)
        if self.fps_line and t1 - self.t_line > 0.5:
            self.t_line = t1
            sys.stderr.write(f"\r{self.name}: {fps:5.1f} FPS | frames {len(self.stats.records)} | "
                             f"dropped {self.dropped()} | alarm {'ON ' if r.alarm else 'off'}  ")
            sys.stderr.flush()

    def close(self) -> None:
        self.bar.close()
        if self.fps_line:
            sys.stderr.write("\n")
        for sink in (self.video, self.events, self.display):
            if sink is not None:
                sink.close()


def _resize_mask(mask: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    if mask.shape == hw:
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST) > 0


def _notice(msg: str) -> None:
    print(msg, file=sys.stderr)


def output_paths(cfg: RunConfig, source_name: str) -> Dict[str, Optional[Path]]:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name) or "run"
    video = None if (cfg.output or "").lower() == "none" else Path(cfg.output or REPO / "runs" / "realtime" / f"{stem}.mp4")
    base = video if video is not None else REPO / "runs" / "realtime" / f"{stem}.mp4"
    events = Path(cfg.events) if cfg.events else base.with_suffix(".events.jsonl")
    summary = Path(cfg.summary) if cfg.summary else base.with_suffix(".summary.json")
    return {"video": video, "events": events, "summary": summary}


def run(cfg: RunConfig) -> Tuple[int, Dict[str, Any]]:
    """A whole live run: build, stream, write the outputs and the summary; returns (exit status, summary)."""
    if cfg.max_frames is not None and cfg.max_frames < 1:
        raise UsageError("--max-frames must be >= 1")
    if not 0.0 <= cfg.box_threshold <= 1.0:
        raise UsageError("--box-threshold must be in [0, 1]")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(cfg.threads)
    try:
        voting = VotingConfig.parse(cfg.vote, clear=cfg.clear, propagate=not cfg.no_propagate,
                                    mask_window=cfg.mask_window, dilate=cfg.dilate)
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    pcfg = PipelineConfig(voting=voting, fail_closed=cfg.fail_closed, max_frames=cfg.max_frames,
                          realtime=cfg.realtime, audit=cfg.audit, imgsz=parse_imgsz(cfg.imgsz))
    source = open_source(cfg.source, SourceOptions(data=cfg.data, image_fps=cfg.fps, timeout=cfg.timeout,
                                                   model=cfg.model, patch=cfg.patch,
                                                   patch_start=cfg.patch_start, patch_frames=cfg.patch_frames))
    try:
        rt = build(cfg, device, pcfg)
        desc, imgsz = rt.description, rt.imgsz
        pcfg = dataclasses.replace(pcfg, imgsz=imgsz)
        live = source.live or cfg.realtime
        total = min(x for x in (source.length, cfg.max_frames) if x is not None) \
            if (source.length or cfg.max_frames) else None
        paths = output_paths(cfg, source.name)
        out = Outputs(cfg, source, paths, cfg.defense != "none", live, total, desc.get("class_names"))
        info = RunInfo()
        out.dropped = lambda: info.dropped
        try:
            run_pipeline(source, rt.step, out.handle, pcfg, device, out.quit_requested, info)
        finally:
            out.close()
    finally:
        source.close()
    summary: Dict[str, Any] = {"source": cfg.source, "kind": source_kind(cfg.source),
                               **({"source_info": source.info} if getattr(source, "info", None) else {}),
                               "model": cfg.model,
                               **desc, "imgsz": list(imgsz), "device": describe(device),
                               **out.stats.summary(info.wall_s, info.read, info.dropped),
                               **({"box_threshold": cfg.box_threshold} if "task" in desc else {}),
                               "interrupted": info.interrupted, "source_error": info.source_error,
                               "outputs": {k: str(v) if v else None for k, v in paths.items()}}
    if paths["video"] is not None and out.video is not None and out.video.frames == 0:
        paths["video"].unlink(missing_ok=True)
        summary["outputs"]["video"] = None
    paths["summary"].parent.mkdir(parents=True, exist_ok=True)
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    if info.sink_error:
        print(f"error: writing outputs failed: {info.sink_error}", file=sys.stderr)
        return 1, summary
    if info.source_error:
        died = info.source_died and summary["frames"] > 0
        where = f"; the {summary['frames']} frames processed are saved" if died else ""
        print(f"error: {info.source_error}{where}", file=sys.stderr)
        return (3 if died else 2), summary
    if info.interrupted:
        print(f"interrupted: outputs finalised after {summary['frames']} frames", file=sys.stderr)
        return 130, summary
    return 0, summary


def print_summary(s: Dict[str, Any]) -> None:
    """A few human-readable lines; the full summary is in the JSON file."""
    lat = s.get("latency_ms", {})
    e2e = lat.get("end_to_end", {})
    print(f"summary: {s['frames']} frames (read {s['read']}, dropped {s['dropped']}) in {s['wall_s']} s, "
          f"{s['fps']} FPS; alarms raised {s['alarms']}, alarm rate {s['alarm_rate']}, "
          f"second passes {s['second_passes']}, carried by propagation {s['carried_frames']}")
    if e2e:
        parts = [f"{k} {v['p50']}/{v['p95']}/{v['p99']}" for k, v in lat.items() if k in
                 ("end_to_end", "compute", "backbone", "defense", "second_pass")]
        print("latency ms p50/p95/p99: " + "; ".join(parts))
    g = s.get("ground_truth")
    if g and g.get("patched_frames"):
        head = g.get("clean_before_patch", {})
        audit = (f", Z-Mask alone on the unmasked frames {g['unmasked_detection_rate']:.0%}"
                 if "unmasked_detection_rate" in g else "")
        print(f"ground truth: {g['patched_frames']} patched frames: flagged {g['detection_rate']:.0%}, masked "
              f"(flagged or carried by propagation) {g['defended_rate']:.0%}{audit}; alarm on "
              f"{g['alarm_rate_patched']:.0%}, frames-to-alarm {g['frames_to_alarm']}; mask IoU "
              f"{g['mask_iou_mean']:.3f} (pooled {g['mask_iou_pooled']}); clean frames before the patch "
              f"{head.get('frames', 0)} with {head.get('alarm_frames', 0)} alarm frames")
    elif g:
        head = g.get("clean_before_patch", {})
        print(f"ground truth: clean sequence, {head.get('alarms_raised', 0)} alarms raised on "
              f"{head.get('frames', 0)} frames, {head.get('flagged_frames', 0)} frames flagged")
    if s.get("source_info", {}).get("note"):
        print(f"source: {s['source_info']['note']}")
    outs = ", ".join(v for v in s["outputs"].values() if v)
    print(f"wrote {outs}")


__all__ = ["Outputs", "output_paths", "print_summary", "run"]
