"""Defended real-time segmentation or detection: ``python -m realtime.run --source SOURCE``.

Sources (Ultralytics-style): camera0 | video.mp4 | rtsp://host/stream | frames/ | 'frames/*.png' |
camvid:0016E5[@train] | demo (default: a CamVid drive with a crafted patch on a facade).

examples:
  python -m realtime.run                                   # the demo, outputs under runs/realtime/
  python -m realtime.run --source demo --max-frames 100 --output out.mp4 --events ev.jsonl
  python -m realtime.run --source camera0 --show           # live camera, drop-oldest under overload
  python -m realtime.run --source drive.mp4 --realtime     # replay paced at the file's fps
  python -m realtime.run --source rtsp://10.0.0.5/live --vote 3/5 --clear 5 --fail-closed
  python -m realtime.run --source camvid:0006R0@train --defense none
  python -m realtime.run --engine onnxruntime              # same defense, backbone in onnxruntime
  python -m realtime.run --device cuda --engine tensorrt --precision fp16
  python -m realtime.run --model fcos_ddrnet --defense none --box-threshold 0.5   # a detector: boxes out

detectors (--model from realtime.models.list_models("detection")) run on --engine torch in fp32; the
video shows boxes scoring >= --box-threshold and each frame event lists them under "boxes".

defaults: --vote 3/5 --clear 5 --mask-window 3 --dilate 16, chosen on replayed CamVid sequences
(benchmarks/results/realtime_cpu.md). Propagation masks a frame before the backbone only while the
alarm is on. --fail-closed: a frame whose defense errors gets no segmentation (event "unsafe": true)
instead of the undefended output (the default, event "error" set).

exit status: 0 done; 2 bad arguments, source, model or calibration; 3 the source died mid-stream
(the output video is still complete and playable); 130 interrupted (Ctrl-C; outputs finalised).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

# Before torch loads OpenMP: idle OpenMP workers must sleep, not spin, or they starve this
# pipeline's own decode/sink threads (measured on 2 cores: a 64x96 backbone pass went from
# ~1.5 s to ~16 ms under load). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engines import PRECISIONS, list_engines  # noqa: E402
from realtime.build import UsageError, build_runtime  # noqa: E402
from realtime.cli import parse_hw  # noqa: E402
from realtime.devices import describe, pick_device  # noqa: E402
from realtime.models import list_models  # noqa: E402
from realtime.defenses.registry import list_defenses  # noqa: E402
from realtime.pipeline import PipelineConfig, RunInfo, StepResult, Work, run_pipeline  # noqa: E402
from realtime.sinks.boxes import box_records  # noqa: E402
from realtime.sinks.display import open_display  # noqa: E402
from realtime.sinks.events import EventWriter, RunStats, iou, mask_box  # noqa: E402
from realtime.sinks.video import VideoWriter, annotate  # noqa: E402
from realtime.sources import Source, SourceError, SourceOptions, open_source, source_kind  # noqa: E402
from realtime.voting import VotingConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m realtime.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="demo", help="cameraN, file, URL, folder, glob, camvid:SEQ or demo")
    p.add_argument("--model", default="ddrnet23_slim", choices=list_models())
    p.add_argument("--weights", default="default",
                   help="checkpoint path (default: the shipped CamVid weights; 'none': random init, for testing)")
    p.add_argument("--defense", default="zmask", choices=list_defenses(),
                   help="zmask (default), none, or a baseline: lgs, slgs, wlgs, patchzero, taintradar, fpda, hn")
    p.add_argument("--calibration", default=None, help="Z-Mask artifact (default calibration/shipped/<model>.safetensors)")
    p.add_argument("--threshold", type=float, default=None,
                   help="per-frame detection threshold on the Z-Mask score (default: the calibration's lambda0)")
    p.add_argument("--engine", default="torch", choices=list_engines(),
                   help="backbone runtime (exported engines are cached under $REALTIME_ENGINE_CACHE, "
                        "default ~/.cache/zmask-realtime/engines)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="compute precision of the engine (outputs and Z-Mask stay float32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--output", default=None, help="annotated video (default runs/realtime/<source>.mp4; 'none' to skip)")
    p.add_argument("--events", default=None, help="JSON-lines events (default: next to the video)")
    p.add_argument("--summary", default=None, help="run summary JSON (default: next to the video)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--vote", default="3/5", help="k/n: alarm when k of the last n frames detect; k/n/m; or off")
    p.add_argument("--clear", type=int, default=None, help="m: consecutive clean frames that clear the alarm (default 5)")
    p.add_argument("--mask-window", type=int, default=VotingConfig.mask_window,
                   help="frames a detected mask is propagated while the alarm is on")
    p.add_argument("--dilate", type=int, default=VotingConfig.dilate, help="pixels of motion margin on a propagated mask")
    p.add_argument("--no-propagate", action="store_true", help="never mask a frame before its first pass")
    p.add_argument("--fail-closed", action="store_true",
                   help="a frame whose defense fails gets NO output (marked unsafe) instead of an undefended one")
    p.add_argument("--box-threshold", type=float, default=0.4,
                   help="detectors: boxes scoring at least this are drawn and logged (default 0.4)")
    p.add_argument("--show", action="store_true", help="on-screen window when a display exists")
    p.add_argument("--realtime", action="store_true", help="pace file/folder replays at their fps (drops frames)")
    p.add_argument("--imgsz", default=None, help="model input HxW (default: the calibration's, else 360x480)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of image folders")
    p.add_argument("--data", default=None, help="CamVid root for camvid:/demo sources")
    p.add_argument("--patch", default=None, help="demo: patch PNG (default: the library patch for --model)")
    p.add_argument("--patch-start", type=int, default=None, help="demo: first patched frame (default 30)")
    p.add_argument("--patch-frames", type=int, default=None, help="demo: patched frames, 0 = to the end (default 55)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a network stream")
    p.add_argument("--audit", action="store_true",
                   help="measurement: also analyse the unmasked frame when propagation masked it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar / FPS line")
    return p.parse_args(argv)


def parse_imgsz(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        return parse_hw(text, minimum=32)
    except ValueError as exc:
        raise UsageError(f"--imgsz: {exc}") from None


class Outputs:
    """The sinks: annotated video, events, summary statistics, optional window, progress display."""

    def __init__(self, args: argparse.Namespace, source: Source, paths: Dict[str, Optional[Path]],
                 defended: bool, live: bool, total: Optional[int],
                 class_names: Optional[Sequence[str]] = None) -> None:
        fps = source.fps or args.fps
        self.video = VideoWriter(paths["video"], fps=min(max(fps, 1.0), 60.0)) if paths["video"] else None
        self.events = EventWriter(paths["events"]) if paths["events"] else None
        self.stats = RunStats()
        self.defended, self.live, self.name = defended, live, source.name
        self.display = open_display(f"realtime: {source.name}", _notice) if args.show else None
        show_bar = not args.quiet and not live
        self.bar = tqdm(total=total, unit="frame", desc=source.name, disable=not show_bar, file=sys.stderr)
        self.fps_line = live and not args.quiet
        self.done: Deque[float] = deque(maxlen=30)
        self.t_line = 0.0
        self.dropped = lambda: 0
        # a detector's label names (None for a segmenter) and the score its boxes must reach to be shown
        self.class_names = tuple(class_names) if class_names is not None else None
        self.box_threshold = args.box_threshold

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
        rec: Dict[str, Any] = {
            "type": "frame", "frame": len(self.stats.records), "source_frame": w.frame.index,
            "timestamp": round(w.frame.timestamp, 4), "score": None if r.score is None else round(r.score, 5),
            "flagged": r.flagged, "alarm": r.alarm, "alarm_raised": r.raised, "mask_box": mask_box(r.masked),
            "mask_frac": round(float(r.masked.mean()), 5) if r.masked is not None else 0.0,
            "second_pass": r.second_pass, "propagated": r.propagated, "carried": r.carried,
            "unsafe": r.unsafe, "error": r.error, "stages_ms": stages,
            "compute_ms": round(sum(v for k, v in stages.items() if k not in ("decode", "sink")), 2),
            "latency_ms": round((time.perf_counter() - w.t_read) * 1000.0, 2)}
        if r.raw_flagged is not None:
            rec["raw_flagged"] = r.raw_flagged
        if self.class_names is not None:   # a detector: its boxes (None on an unsafe frame: no output)
            rec["boxes"] = box_records(shown, self.class_names) if shown is not None else None
        if gt is not None:
            c = iou(r.masked, gt)
            rec.update(gt_patch=bool(gt.any()), gt_inter=c["inter"], gt_union=c["union"],
                       gt_iou=round(c["inter"] / c["union"], 4) if c["union"] else None)
        if self.events is not None:
            self.events.write(rec)
            if r.raised or r.cleared:
                self.events.write({"type": "alarm", "state": "on" if r.raised else "off", "frame": rec["frame"],
                                   "timestamp": rec["timestamp"]})
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


def output_paths(args: argparse.Namespace, source_name: str) -> Dict[str, Optional[Path]]:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name) or "run"
    video = None if (args.output or "").lower() == "none" else Path(args.output or REPO / "runs" / "realtime" / f"{stem}.mp4")
    base = video if video is not None else REPO / "runs" / "realtime" / f"{stem}.mp4"
    events = Path(args.events) if args.events else base.with_suffix(".events.jsonl")
    summary = Path(args.summary) if args.summary else base.with_suffix(".summary.json")
    return {"video": video, "events": events, "summary": summary}


def run(args: argparse.Namespace) -> Tuple[int, Dict[str, Any]]:
    """Everything behind the CLI; returns (exit status, summary)."""
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError("--max-frames must be >= 1")
    if not 0.0 <= args.box_threshold <= 1.0:
        raise UsageError("--box-threshold must be in [0, 1]")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        voting = VotingConfig.parse(args.vote, clear=args.clear, propagate=not args.no_propagate,
                                    mask_window=args.mask_window, dilate=args.dilate)
        device = pick_device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    cfg = PipelineConfig(voting=voting, fail_closed=args.fail_closed, max_frames=args.max_frames,
                         realtime=args.realtime, audit=args.audit, imgsz=parse_imgsz(args.imgsz))
    source = open_source(args.source, SourceOptions(data=args.data, image_fps=args.fps, timeout=args.timeout,
                                                   model=args.model, patch=args.patch,
                                                   patch_start=args.patch_start, patch_frames=args.patch_frames))
    try:
        engine, desc, imgsz = build_runtime(args, device, cfg)
        cfg = PipelineConfig(**{**cfg.__dict__, "imgsz": imgsz})
        live = source.live or cfg.realtime
        total = min(x for x in (source.length, cfg.max_frames) if x is not None) \
            if (source.length or cfg.max_frames) else None
        paths = output_paths(args, source.name)
        out = Outputs(args, source, paths, args.defense != "none", live, total, desc.get("class_names"))
        info = RunInfo()
        out.dropped = lambda: info.dropped
        try:
            run_pipeline(source, engine, out.handle, cfg, device, out.quit_requested, info)
        finally:
            out.close()
    finally:
        source.close()
    summary: Dict[str, Any] = {"source": args.source, "kind": source_kind(args.source), "model": args.model,
                               **desc, "imgsz": list(imgsz), "device": describe(device),
                               **out.stats.summary(info.wall_s, info.read, info.dropped),
                               **({"box_threshold": args.box_threshold} if "task" in desc else {}),
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
    outs = ", ".join(v for v in s["outputs"].values() if v)
    print(f"wrote {outs}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        code, _ = run(args)
        return code
    except (UsageError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the first frame", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, unless debugging
        if os.environ.get("REALTIME_DEBUG"):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(set REALTIME_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
