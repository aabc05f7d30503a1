"""The end of a live run: its summary (JSON file + a few printed lines) and its exit status.

Exit status: 0 done; 1 writing the outputs failed mid-run; 2 bad arguments, source, model or
calibration (found before any frame is processed); 3 the source died mid-stream (what was processed
is saved); 4 ``--fail-closed`` and the defense failed on at least one frame (those frames were
marked unsafe); 128 + N a stop signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP), outputs finalised.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

from realtime.core import signals

from .pipeline import RunInfo
from .sinks.events import dumps

EXIT_OK, EXIT_SINK, EXIT_USAGE, EXIT_DIED, EXIT_FAIL_CLOSED = 0, 1, 2, 3, 4


def write_summary(path: Path, summary: Dict[str, Any]) -> None:
    """Strict JSON (no NaN), written in place (a device such as /dev/null is never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(summary, indent=2) + "\n")


def run_status(info: RunInfo, summary: Dict[str, Any], fail_closed: bool) -> int:
    """Print the closing ``error:`` / ``interrupted:`` line (if any) and return the exit status."""
    if info.sink_error:
        print(f"error: writing outputs failed: {info.sink_error}", file=sys.stderr)
        return EXIT_SINK
    if info.source_error:
        died = info.source_died and summary["frames"] > 0
        where = f"; the {summary['frames']} frames processed are saved" if died else ""
        print(f"error: {info.source_error}{where}", file=sys.stderr)
        return EXIT_DIED if died else EXIT_USAGE
    if info.interrupted:
        name = signals.signal_name(info.signal or 2)
        print(f"interrupted ({name}): outputs finalised after {summary['frames']} frames", file=sys.stderr)
        return 128 + (info.signal or 2)
    if fail_closed and summary.get("defense_errors"):
        print(f"error: the defense failed on {summary['defense_errors']} of {summary['frames']} frames "
              f"(--fail-closed: marked unsafe, no output): {summary['defense_error']}", file=sys.stderr)
        return EXIT_FAIL_CLOSED
    return EXIT_OK


def print_summary(s: Dict[str, Any]) -> None:
    """A few human-readable lines; the full summary is in the JSON file."""
    lat = s.get("latency_ms", {})
    e2e = lat.get("end_to_end", {})
    print(f"summary: {s['frames']} frames (read {s['read']}, dropped {s['dropped']}) in {s['wall_s']} s, "
          f"{s['fps']} FPS; alarms raised {s['alarms']}, alarm rate {s['alarm_rate']}, "
          f"second passes {s['second_passes']}, carried by propagation {s['carried_frames']}; "
          f"stopped: {s.get('stopped', 'end of source')}")
    if s.get("defense_errors"):
        policy = ("marked unsafe, no output (--fail-closed)" if s.get("fail_closed")
                  else "given the UNDEFENDED output (fail-open)")
        print(f"WARNING: the defense failed on {s['defense_errors']} of {s['frames']} frames, {policy}; "
              f"first error: {s.get('defense_error')}")
    gaps = s.get("reconnects") or []
    if gaps:
        ok = [g for g in gaps if g.get("ok")]
        print(f"source: {len(ok)} reconnects, {sum(g['gap_s'] for g in ok):.1f} s without frames"
              + ("; gave up after the last drop" if len(ok) < len(gaps) else ""))
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


__all__ = ["EXIT_DIED", "EXIT_FAIL_CLOSED", "EXIT_OK", "EXIT_SINK", "EXIT_USAGE", "print_summary", "run_status",
           "write_summary"]
