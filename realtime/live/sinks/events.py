"""JSON-lines events and the run summary.

Events: one ``{"type": "frame", ...}`` line per processed frame (frame, timestamp, score, alarm,
mask box, per-stage ms ...; for detectors also ``"boxes": [{"label", "score", "box"}, ...]``) and one ``{"type": "alarm", "state": "on"|"off"}`` line per alarm
transition. Every line is flushed, so a killed run leaves a valid file up to its last frame.

Summary: counts, latency percentiles per stage, and, when the source knows where the patch is
(``demo``; clean CamVid replays know there is none), detection rate, alarms on clean frames,
frames-to-alarm and patch-mask IoU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

STAGES = ("decode", "preprocess", "backbone", "defense", "vote", "second_pass", "postprocess", "sink")


def mask_box(mask: Optional[np.ndarray]) -> Optional[List[int]]:
    """[x0, y0, x1, y1] (inclusive-exclusive) of a boolean mask, None when empty."""
    if mask is None or not mask.any():
        return None
    ys = np.nonzero(mask.any(1))[0]
    xs = np.nonzero(mask.any(0))[0]
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def iou(a: Optional[np.ndarray], b: np.ndarray) -> Dict[str, int]:
    """Intersection and union pixel counts of two boolean masks (a None = empty)."""
    if a is None:
        return {"inter": 0, "union": int(b.sum())}
    return {"inter": int((a & b).sum()), "union": int((a | b).sum())}


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (never ``NaN``): non-finite numbers become null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


class EventWriter:
    """Append JSON lines to ``path`` (created with its parent folder; truncated at open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8")
        self.lines = 0

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        self.lines += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _pct(values: List[float]) -> Dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "mean": round(float(a.mean()), 2)}


class RunStats:
    """Accumulates frame records (the dicts written as events) into the run summary."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []

    def add(self, rec: Dict[str, Any]) -> None:
        self.records.append(rec)

    def summary(self, wall_s: float, read: int, dropped: int) -> Dict[str, Any]:
        r = self.records
        n = len(r)
        s: Dict[str, Any] = {
            "frames": n, "read": read, "dropped": dropped, "wall_s": round(wall_s, 2),
            "fps": round(n / wall_s, 2) if wall_s > 0 else None,
            "alarms": sum(1 for x in r if x.get("alarm_raised")),
            "alarm_frames": sum(1 for x in r if x["alarm"]),
            "alarm_rate": round(sum(1 for x in r if x["alarm"]) / n, 4) if n else 0.0,
            "flagged_frames": sum(1 for x in r if x.get("flagged")),
            "second_passes": sum(1 for x in r if x.get("second_pass")),
            "propagated_frames": sum(1 for x in r if x.get("propagated")),
            "carried_frames": sum(1 for x in r if x.get("carried")),
            "unsafe_frames": sum(1 for x in r if x.get("unsafe")),
            "defense_errors": sum(1 for x in r if x.get("error")),
            "defense_error": next((x["error"] for x in r if x.get("error")), None),   # the first one
        }
        audited = [x for x in r if x.get("propagated") and x.get("raw_flagged") is not None]
        if audited:
            need = [x for x in audited if x["raw_flagged"]]
            s["propagation_audit"] = {
                "propagated_frames": len(audited), "raw_would_flag": len(need),
                "second_pass_removed": sum(1 for x in need if not x["second_pass"]),
                "removed_rate": round(sum(1 for x in need if not x["second_pass"]) / len(need), 4) if need else None}
        lat = {st: _pct([x["stages_ms"][st] for x in r if st in x.get("stages_ms", {})]) for st in STAGES}
        lat["compute"] = _pct([x["compute_ms"] for x in r if "compute_ms" in x])
        lat["end_to_end"] = _pct([x["latency_ms"] for x in r if "latency_ms" in x])
        s["latency_ms"] = {k: v for k, v in lat.items() if v}
        shown = [x["boxes"] for x in r if "boxes" in x]
        if shown:    # a detector's run: how much it reported (frames with no output carry None)
            s["detections"] = {"boxes": sum(len(b) for b in shown if b),
                               "frames_with_boxes": sum(1 for b in shown if b)}
        gt = [x for x in r if "gt_patch" in x]
        if gt:
            s["ground_truth"] = self._gt_summary(gt)
        return s

    @staticmethod
    def _gt_summary(r: List[Dict[str, Any]]) -> Dict[str, Any]:
        patched = [x for x in r if x["gt_patch"]]
        clean = [x for x in r if not x["gt_patch"]]
        first = next((i for i, x in enumerate(r) if x["gt_patch"]), None)
        head = clean if first is None else r[:first]
        g: Dict[str, Any] = {"patched_frames": len(patched), "clean_frames": len(clean)}
        if clean:
            raises = sum(1 for x in head if x.get("alarm_raised"))
            g["clean_before_patch"] = {"frames": len(head), "alarm_frames": sum(1 for x in head if x["alarm"]),
                                       "alarms_raised": raises, "flagged_frames": sum(1 for x in head if x.get("flagged")),
                                       "false_alarms_per_1000": round(1000.0 * raises / len(head), 2) if head else None}
            g["clean_masked_pixel_frac"] = round(float(np.mean([x.get("mask_frac", 0.0) for x in clean])), 5)
        if patched:
            g["detection_rate"] = round(sum(1 for x in patched if x.get("flagged")) / len(patched), 4)
            g["defended_rate"] = round(sum(1 for x in patched if x.get("flagged") or x.get("carried"))
                                       / len(patched), 4)
            if all(x.get("raw_flagged") is not None for x in patched if x.get("propagated")) and \
                    any(x.get("raw_flagged") is not None for x in r):
                # --audit: what Z-Mask alone says on the UNmasked frame, for every patched frame
                raw = [x["raw_flagged"] if x.get("propagated") else x.get("flagged") for x in patched]
                g["unmasked_detection_rate"] = round(sum(map(bool, raw)) / len(raw), 4)
            g["alarm_rate_patched"] = round(sum(1 for x in patched if x["alarm"]) / len(patched), 4)
            alarm_at = next((i for i, x in enumerate(r[first:]) if x["alarm"]), None)
            g["frames_to_alarm"] = alarm_at
            ious = [x["gt_inter"] / x["gt_union"] if x["gt_union"] else 0.0 for x in patched]
            g["mask_iou_mean"] = round(float(np.mean(ious)), 4)
            det = [v for v, x in zip(ious, patched) if x.get("mask_frac", 0) > 0]
            g["mask_iou_mean_when_masked"] = round(float(np.mean(det)), 4) if det else None
            inter = sum(x["gt_inter"] for x in r)
            union = sum(x["gt_union"] for x in r)
            g["mask_iou_pooled"] = round(inter / union, 4) if union else None
            last = max(i for i, x in enumerate(r) if x["gt_patch"])
            tail = r[last + 1:]
            if tail:
                off = next((i for i, x in enumerate(tail) if not x["alarm"]), None)
                g["frames_to_clear_after_patch"] = off
        return g
