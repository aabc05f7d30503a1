"""The typed, versioned schema of the live pipeline's JSON-lines events.

An events file starts with one ``RunHeader`` line (``"type": "run"``, ``"schema": SCHEMA``), then one
``FrameEvent`` per processed frame, one ``AlarmEvent`` per alarm transition and, for live sources,
one ``ReconnectEvent`` per dropped connection. In a multi-stream run (several ``--source``) every
line also carries ``stream``: the index of its source in the run (single-stream runs leave it out).
Consumers should check ``schema``; fields are only ever added within a version, never renamed or removed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA = "zmask-events/1"


def _tagged(rec: Dict[str, Any], stream: Optional[int]) -> Dict[str, Any]:
    """``rec`` with ``stream`` after ``type`` when set (multi-stream runs)."""
    if stream is None:
        return rec
    return {"type": rec["type"], "stream": stream, **{k: v for k, v in rec.items() if k != "type"}}


@dataclass
class RunHeader:
    """First line: which schema, and what ran (source, model, defense)."""
    source: str
    model: str
    defense: str
    type: str = "run"
    schema: str = SCHEMA
    stream: Optional[int] = None        # multi-stream runs: the source's index
    evidence: Optional[float] = None    # --evidence: mean score / lambda0 over the window, once full

    def to_dict(self) -> Dict[str, Any]:
        return _tagged({k: v for k, v in asdict(self).items() if k != "stream"}, self.stream)


@dataclass
class FrameEvent:
    """One processed frame. ``frame`` counts processed frames; ``source_frame`` is the source's index.

    Optional groups: ``raw_flagged`` (``--audit``), ``boxes`` (detectors), ``gt_*`` (sources that
    know where the patch is), ``evidence`` (``--evidence``: the window's mean score / lambda0); they are
    left out of the record when not set."""
    frame: int
    source_frame: int
    timestamp: float
    score: Optional[float]
    flagged: bool
    alarm: bool
    alarm_raised: bool
    mask_box: Optional[List[int]]
    mask_frac: float
    second_pass: bool
    propagated: bool
    carried: bool
    unsafe: bool
    error: Optional[str]
    stages_ms: Dict[str, float]
    compute_ms: float
    latency_ms: float
    raw_flagged: Optional[bool] = None
    boxes: Optional[List[Dict[str, Any]]] = None
    has_boxes: bool = False                 # a detector's frame: ``boxes`` is written even when None
    gt: Dict[str, Any] = field(default_factory=dict)   # gt_patch, gt_inter, gt_union, gt_iou
    type: str = "frame"
    stream: Optional[int] = None        # multi-stream runs: the source's index
    evidence: Optional[float] = None    # --evidence: mean score / lambda0 over the window, once full

    def to_dict(self) -> Dict[str, Any]:
        rec = {k: v for k, v in asdict(self).items()
               if k not in ("raw_flagged", "boxes", "has_boxes", "gt", "type", "stream", "evidence")}
        rec = _tagged({"type": self.type, **rec}, self.stream)
        if self.raw_flagged is not None:
            rec["raw_flagged"] = self.raw_flagged
        if self.evidence is not None:
            rec["evidence"] = self.evidence
        if self.has_boxes:
            rec["boxes"] = self.boxes
        rec.update(self.gt)
        return rec


@dataclass
class AlarmEvent:
    """The alarm turned on or off at ``frame``."""
    state: str          # "on" | "off"
    frame: int
    timestamp: float
    type: str = "alarm"
    stream: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return _tagged({"type": self.type, "state": self.state, "frame": self.frame, "timestamp": self.timestamp},
                       self.stream)


@dataclass
class ReconnectEvent:
    """A live source dropped before ``frame`` and came back (``ok``) after ``gap_s`` s and ``attempts``
    tries, or did not (``ok`` false: the run ends there). ``error`` is why it dropped."""
    frame: int
    ok: bool
    gap_s: float
    attempts: int
    error: Optional[str]
    type: str = "reconnect"
    stream: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return _tagged({"type": self.type, "frame": self.frame, "ok": self.ok, "gap_s": self.gap_s,
                        "attempts": self.attempts, "error": self.error}, self.stream)


__all__ = ["AlarmEvent", "FrameEvent", "ReconnectEvent", "RunHeader", "SCHEMA"]
