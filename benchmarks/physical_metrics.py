"""Accumulators of the physical-scene benchmark: mIoU outside the poster, masks, flags and alarms.

Everything is kept as sums (confusion matrices, pixel counts, frame counts) so runs over several
sequences and placements add up exactly and a resumed benchmark gives the same totals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from realtime.core.metrics import ConfusionMatrix
from realtime.data import IGNORE_INDEX, NUM_CLASSES

# The label maps scored on patched frames: the clean twin, the attacked frame, Z-Mask on it (single frame),
# the live step's output, and the oracle mask (the true poster pixels filled as Z-Mask fills its mask: the
# most any masking defense can give back).
OUTPUTS = ("clean", "attacked", "defended", "live", "oracle")


def confusion(pred: np.ndarray, label: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C,C) int64 confusion matrix (rows truth) over ``valid`` pixels with a real label."""
    cm = ConfusionMatrix(NUM_CLASSES, IGNORE_INDEX)
    cm.update(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(label)), torch.from_numpy(valid))
    return cm.mat.numpy()


def miou(mat: np.ndarray) -> float:
    """Mean IoU over the classes present in truth or prediction (``ConfusionMatrix.iou``)."""
    cm = ConfusionMatrix(NUM_CLASSES, IGNORE_INDEX)
    cm.mat = torch.from_numpy(np.asarray(mat, np.int64))
    present = [v for v in cm.iou().tolist() if v == v]
    return sum(present) / len(present) if present else float("nan")


@dataclass
class MaskSums:
    """Pixel sums of a predicted mask against the true poster mask, pooled over frames."""
    inter: int = 0
    pred: int = 0
    true: int = 0
    frame_ious: List[float] = field(default_factory=list)     # per frame where the mask is not empty

    def add(self, masked: Optional[np.ndarray], gt: np.ndarray) -> None:
        m = masked if masked is not None else np.zeros_like(gt)
        i, p, t = int((m & gt).sum()), int(m.sum()), int(gt.sum())
        self.inter, self.pred, self.true = self.inter + i, self.pred + p, self.true + t
        if p:
            self.frame_ious.append(i / max(p + t - i, 1))

    def merge(self, other: "MaskSums") -> None:
        self.inter += other.inter
        self.pred += other.pred
        self.true += other.true
        self.frame_ious.extend(other.frame_ious)

    def summary(self) -> Dict[str, Optional[float]]:
        union = self.pred + self.true - self.inter
        return {"iou_pooled": self.inter / union if union else None,
                "precision": self.inter / self.pred if self.pred else None,
                "recall": self.inter / self.true if self.true else None,
                "iou_mean_masked_frames": float(np.mean(self.frame_ious)) if self.frame_ious else None,
                "masked_frames": len(self.frame_ious)}

    def to_dict(self) -> Dict:
        return {"inter": self.inter, "pred": self.pred, "true": self.true, "frame_ious": self.frame_ious}

    @classmethod
    def from_dict(cls, d: Dict) -> "MaskSums":
        return cls(int(d["inter"]), int(d["pred"]), int(d["true"]), list(d["frame_ious"]))


@dataclass
class RunSums:
    """One (sequence, placement) run: patched-frame scores and the live alarm."""
    frames: int = 0
    patched: int = 0
    flagged: int = 0                   # single-frame flags on patched frames
    live_flagged: int = 0              # fresh or carried positive votes on patched frames
    alarm_frames: int = 0              # patched frames with the alarm on
    frames_to_alarm: Optional[int] = None
    cms: Dict[str, np.ndarray] = field(default_factory=lambda: {k: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
                                                                 for k in OUTPUTS})
    mask: MaskSums = field(default_factory=MaskSums)
    live_mask: MaskSums = field(default_factory=MaskSums)
    scores: List[Optional[float]] = field(default_factory=list)        # single-frame d per frame (attacked view)
    live: List[int] = field(default_factory=list)                      # per frame: 2 alarm, 1 vote, 0 none
    gt: List[bool] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return {"frames": self.frames, "patched": self.patched, "flagged": self.flagged,
                "live_flagged": self.live_flagged, "alarm_frames": self.alarm_frames,
                "frames_to_alarm": self.frames_to_alarm, "cms": {k: v.tolist() for k, v in self.cms.items()},
                "mask": self.mask.to_dict(), "live_mask": self.live_mask.to_dict(), "scores": self.scores,
                "live": self.live, "gt": self.gt}

    @classmethod
    def from_dict(cls, d: Dict) -> "RunSums":
        r = cls(d["frames"], d["patched"], d["flagged"], d["live_flagged"], d["alarm_frames"], d["frames_to_alarm"])
        r.cms = {k: np.asarray(v, np.int64) for k, v in d["cms"].items()}
        r.mask, r.live_mask = MaskSums.from_dict(d["mask"]), MaskSums.from_dict(d["live_mask"])
        r.scores, r.live, r.gt = list(d["scores"]), list(d["live"]), list(d["gt"])
        return r


def damage_undone(clean: float, attacked: float, defended: float) -> Optional[float]:
    """Fraction of the attack's mIoU damage the defense gives back (None when the attack did no damage)."""
    damage = clean - attacked
    return (defended - attacked) / damage if damage > 1e-6 else None


def totals(runs: Sequence[RunSums], clean_flags: Sequence[Sequence[bool]], clean_alarms: Sequence[Sequence[bool]]
           ) -> Dict:
    """The headline numbers over all runs, plus clean-frame false positives and false alarms."""
    cms = {k: sum((r.cms[k] for r in runs), np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)) for k in OUTPUTS}
    mask, live_mask = MaskSums(), MaskSums()
    for r in runs:
        mask.merge(r.mask)
        live_mask.merge(r.live_mask)
    m = {k: miou(v) for k, v in cms.items()}
    patched = sum(r.patched for r in runs)
    delays = [r.frames_to_alarm for r in runs]
    clean_n = sum(len(f) for f in clean_flags)
    return {
        "runs": len(runs), "patched_frames": patched,
        "miou": m, "damage": m["clean"] - m["attacked"],
        "damage_undone": damage_undone(m["clean"], m["attacked"], m["defended"]),
        "damage_undone_live": damage_undone(m["clean"], m["attacked"], m["live"]),
        "damage_undone_oracle": damage_undone(m["clean"], m["attacked"], m["oracle"]),
        "flag_rate": sum(r.flagged for r in runs) / max(patched, 1),
        "live_vote_rate": sum(r.live_flagged for r in runs) / max(patched, 1),
        "alarm_rate": sum(r.alarm_frames for r in runs) / max(patched, 1),
        "frames_to_alarm": {"max": None if None in delays else max(delays, default=None),
                            "mean": None if None in delays or not delays else float(np.mean(delays)),
                            "never": sum(d is None for d in delays)},
        "mask": mask.summary(), "live_mask": live_mask.summary(),
        "clean_frames": clean_n,
        "clean_fpr": sum(sum(f) for f in clean_flags) / max(clean_n, 1),
        "clean_alarm_frames": sum(sum(a) for a in clean_alarms),
        "clean_sequences_with_alarm": sum(any(a) for a in clean_alarms),
    }


__all__ = ["MaskSums", "OUTPUTS", "RunSums", "confusion", "damage_undone", "miou", "totals"]
