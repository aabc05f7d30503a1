"""Temporal consistency voting with hysteresis, and mask propagation between frames.

Alarm: raised when at least ``k`` of the last ``n`` votes are positive; cleared after ``m``
consecutive negative votes (hysteresis: one stray clean frame does not drop an alarm, one stray
detection does not raise one). The vote window is emptied when the alarm clears, so an alarm is
never re-raised by the votes that were already counted.

Propagation (only while the alarm is on, so a single false detection never masks later frames):
every FRESH detection's masked region goes into a ring of the last ``mask_window`` frames; the union
of the ring, dilated by ``dilate`` pixels for motion, is applied to the next frame BEFORE the
backbone runs. If the masked first pass is then clean, the frame needs no second pass ("carried":
the patch is hidden where it was last seen, which counts as a positive vote). Carried frames add
nothing to the ring, so a stale mask expires ``mask_window`` frames after the last real detection;
the next frame is then analysed unmasked and either re-detects the patch or votes clean.
With ``motion`` (opt-in, ``--motion``) the ring's masks are moved by the scene's motion between frames first (the patch is
a plane: a homography tracked around the mask, ``realtime.live.motion``), so the carried mask follows
a poster the car drives past instead of lagging behind it.

Evidence (opt-in, ``--evidence N:R``): a second way to raise the alarm, for a patch that keeps its score
just under lambda0 on every frame. The mean of ``score / lambda0`` over the last ``N`` unmasked first
passes raises (and holds) the alarm when it exceeds ``R``; ``R`` comes from clean footage
(``fit_evidence``: the largest N-frame mean seen on clean training sequences, times a margin). It only
alarms: frames it covers are not masked unless they are flagged themselves.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from realtime.core.types import dilate

from .motion import estimate_motion, gray, warp_mask


@dataclass(frozen=True)
class VotingConfig:
    """k of n to raise, m consecutive negatives to clear, and the propagation settings."""
    k: int = 3
    n: int = 5
    m: int = 5
    enabled: bool = True                 # False: the alarm is the per-frame detection
    propagate: bool = True
    mask_window: int = 3                 # frames a fresh detection mask keeps being propagated
    dilate: int = 16                     # pixels of dilation on the propagated mask (motion margin)
    motion: bool = False                 # move carried masks with the scene (``realtime.live.motion``); opt-in:
                                         # it helped DDRNet and hurt BiSeNet on the physical benchmark
    evidence: int = 0                    # frames in the score-evidence window (0: off)
    evidence_ratio: float = 1.0          # alarm when their mean score / lambda0 exceeds this

    def __post_init__(self) -> None:
        if self.n < 1 or not 1 <= self.k <= self.n:
            raise ValueError(f"voting needs 1 <= k <= n, got k={self.k}, n={self.n}")
        if self.m < 1:
            raise ValueError(f"voting needs m >= 1 frames to clear, got {self.m}")
        if self.mask_window < 1 or self.dilate < 0:
            raise ValueError("mask_window must be >= 1 and dilate >= 0")
        if self.evidence < 0 or not self.evidence_ratio > 0:
            raise ValueError(f"evidence needs N >= 0 frames and a ratio > 0, got {self.evidence}:{self.evidence_ratio}")

    @classmethod
    def parse(cls, text: str, clear: Optional[int] = None, **kw: object) -> "VotingConfig":
        """``'k/n'`` or ``'k/n/m'`` (``clear`` overrides m; default m = the class default) or ``'off'``."""
        t = text.strip().lower()
        if t in ("off", "none"):
            return cls(k=1, n=1, m=1, enabled=False, **kw)
        try:
            nums = [int(p) for p in t.split("/")]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3):
            raise ValueError(f"--vote expects k/n or k/n/m (e.g. 3/5), or off; got '{text}'")
        m = clear if clear is not None else (nums[2] if len(nums) == 3 else cls.m)
        return cls(k=nums[0], n=nums[1], m=m, **kw)

    @staticmethod
    def parse_evidence(text: Optional[str]) -> Tuple[int, float]:
        """``'N:R'`` (window, ratio) or None/'off' -> (0, 1.0)."""
        if text is None or text.strip().lower() in ("off", "none", ""):
            return 0, 1.0
        try:
            n, r = text.split(":")
            return int(n), float(r)
        except ValueError:
            raise ValueError(f"--evidence expects N:R (frames:mean score over lambda0, e.g. 8:0.75), got '{text}'") from None

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        prop = (f", propagate {self.mask_window} frames +{self.dilate}px{', motion-compensated' if self.motion else ''}"
                if self.propagate else ", no propagation")
        ev = (f", evidence: mean score > {self.evidence_ratio:g} lambda0 over {self.evidence} frames"
              if self.evidence else "")
        return f"{self.k}/{self.n} to raise, {self.m} clean to clear{prop}{ev}"


@dataclass
class VoteState:
    """The voter's decision for one frame."""
    vote: bool              # this frame's vote (fresh detection or carried)
    alarm: bool             # alarm state after this frame
    raised: bool            # the alarm turned on at this frame
    cleared: bool           # the alarm turned off at this frame
    positives: int          # positive votes in the window
    evidence: Optional[float] = None   # mean score / lambda0 over the evidence window (when full)


class TemporalVoter:
    """Stateful k-of-n / m-to-clear voter plus the propagated-mask ring (masks: 1 = masked)."""

    def __init__(self, cfg: VotingConfig) -> None:
        self.cfg = cfg
        self.window: Deque[bool] = deque(maxlen=cfg.n)
        self.ratios: Deque[float] = deque(maxlen=max(cfg.evidence, 1))
        self.ring: Deque[Optional[torch.Tensor]] = deque(maxlen=cfg.mask_window)
        self.alarm = False
        self.negatives = 0
        self.raises = 0
        self.last_gray: Optional[np.ndarray] = None   # luminance of the frame the ring's masks are aligned to

    def follow(self, frame: torch.Tensor) -> None:
        """Motion compensation (``cfg.motion``): move the ring's masks from the last frame to ``frame``
        (3,H,W) by the homography tracked around them; they stay in place when tracking fails."""
        masks = [m for m in self.ring if m is not None]
        if not masks:
            self.last_gray = None
            return
        cur = gray(frame)
        if self.last_gray is not None:
            region = torch.stack(masks).amax(0)[0, 0] > 0.5
            hom = estimate_motion(self.last_gray, cur, region.cpu().numpy())
            if hom is not None:
                self.ring = deque((None if m is None else warp_mask(m, hom) for m in self.ring),
                                  maxlen=self.cfg.mask_window)
        self.last_gray = cur

    def propagated(self) -> Optional[torch.Tensor]:
        """(1,1,H,W) float masked-region (1 = mask) to apply before the backbone, or None."""
        if not (self.cfg.enabled and self.cfg.propagate and self.alarm):
            return None
        masks = [m for m in self.ring if m is not None]
        if not masks:
            return None
        acc = torch.stack(masks).amax(0)
        acc = dilate(acc, self.cfg.dilate)
        return acc if bool(acc.any()) else None

    def evidence(self, ratio: Optional[float]) -> Optional[float]:
        """Add one unmasked first pass's ``score / lambda0`` (None: masked or unscored, not added); the
        window's mean once it is full (None before, or when evidence is off)."""
        if not self.cfg.evidence:
            return None
        if ratio is not None:
            self.ratios.append(float(ratio))
        return sum(self.ratios) / len(self.ratios) if len(self.ratios) == self.cfg.evidence else None

    def update(self, detected: bool, fresh_mask: Optional[torch.Tensor] = None, carried: bool = False,
               frame: Optional[torch.Tensor] = None, ratio: Optional[float] = None) -> VoteState:
        """Record one frame: ``detected`` (fresh flag), its masked region, and whether it was carried;
        ``frame`` (3,H,W), with ``cfg.motion``: the frame a first fresh mask is aligned to; ``ratio``:
        its score / lambda0 when its first pass ran unmasked (the evidence window's input)."""
        mean = self.evidence(ratio)
        strong = mean is not None and mean > self.cfg.evidence_ratio
        vote = bool(detected or carried)
        fresh = detected and fresh_mask is not None
        self.ring.append(fresh_mask.detach().float() if fresh else None)
        if fresh and self.cfg.motion and self.last_gray is None and frame is not None:
            self.last_gray = gray(frame)
        if not self.cfg.enabled:
            raised, cleared = vote and not self.alarm, self.alarm and not vote
            self.alarm = vote
            self.raises += int(raised)
            return VoteState(vote, self.alarm, raised, cleared, int(vote), mean)
        self.window.append(vote)
        self.negatives = 0 if vote else self.negatives + 1
        positives = sum(self.window)
        raised = cleared = False
        if not self.alarm and (positives >= self.cfg.k or strong):
            self.alarm = raised = True
            self.raises += 1
        elif self.alarm and self.negatives >= self.cfg.m and not strong:
            self.alarm, cleared = False, True
            self.window.clear()
            self.ring.clear()
            self.last_gray = None
            positives = 0
        return VoteState(vote, self.alarm, raised, cleared, positives, mean)


def simulate(flags, cfg: VotingConfig, ratios: Optional[Sequence[Optional[float]]] = None):
    """Alarm state per frame for a sequence of fresh detections (no propagation): offline tuning;
    ``ratios`` (score / lambda0 per frame) feed the evidence window when ``cfg.evidence`` is on."""
    voter = TemporalVoter(cfg)
    ratios = list(ratios) if ratios is not None else [None] * len(flags)
    return [voter.update(bool(f), ratio=r).alarm for f, r in zip(flags, ratios)]


def window_means(ratios: Sequence[float], n: int) -> np.ndarray:
    """Means of every ``n`` consecutive values (empty when fewer)."""
    r = np.asarray([v for v in ratios if v is not None], np.float64)
    if n < 1 or len(r) < n:
        return np.zeros(0)
    c = np.concatenate([[0.0], np.cumsum(r)])
    return (c[n:] - c[:-n]) / n


def fit_evidence(clean: Sequence[Sequence[float]], n: int, margin: float = 1.0) -> float:
    """The evidence ratio for an ``n``-frame window: the largest n-frame mean of ``score / lambda0`` on any
    clean sequence, times ``margin`` (>= 1 leaves headroom for footage the fit did not see)."""
    means = [window_means(seq, n) for seq in clean]
    means = [m for m in means if m.size]
    if not means:
        raise ValueError(f"no clean sequence has {n} scored frames to fit the evidence window on")
    # a hair above the largest mean: the voter sums its window in another order, and the fitted maximum itself
    # must not alarm through rounding
    return float(max(m.max() for m in means)) * margin * (1.0 + 1e-9) + 1e-12


def _segments(path: str, threshold: Optional[float] = None) -> Tuple[List[bool], Optional[int]]:
    """(per-frame detections, index of the first ground-truth patched frame or None) from an events
    file; detections are the recorded unmasked flags, or ``score > threshold`` when one is given."""
    import json
    flags, first = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            e = json.loads(line)
            if e.get("type") != "frame":
                continue
            if first is None and e.get("gt_patch"):
                first = len(flags)
            if threshold is not None:
                flags.append(e["score"] is not None and e["score"] > threshold)
            else:
                flags.append(bool(e.get("raw_flagged", e["flagged"])))
    return flags, first


def evaluate(clean: Sequence[Sequence[bool]], patched: Sequence[Tuple[Sequence[bool], int]],
             cfg: VotingConfig) -> Dict[str, float]:
    """False alarms per 1000 clean frames, frames-to-alarm and alarm coverage on patched replays."""
    frames = sum(len(c) for c in clean)
    raises = sum(sum(1 for a, b in zip([False] + alarms, alarms) if b and not a)
                 for alarms in (simulate(c, cfg) for c in clean))
    delays, cover, reraise = [], [], 0
    for flags, start in patched:
        alarms = simulate(flags, cfg)[start:]
        delays.append(next((i for i, a in enumerate(alarms) if a), len(alarms)))
        cover.append(sum(alarms) / max(len(alarms), 1))
        reraise += max(0, sum(1 for a, b in zip([False] + alarms, alarms) if b and not a) - 1)
    return {"false_alarms_per_1000": 1000.0 * raises / max(frames, 1),
            "frames_to_alarm_mean": sum(delays) / max(len(delays), 1), "frames_to_alarm_max": max(delays, default=0),
            "alarm_coverage": sum(cover) / max(len(cover), 1), "re_raises": reraise}


def tune(clean: Sequence[Sequence[bool]], patched: Sequence[Tuple[Sequence[bool], int]], max_n: int = 8
         ) -> List[Tuple[VotingConfig, Dict[str, float]]]:
    """Every k/n/m up to ``max_n``, best first: fewest false alarms, then fastest alarm, then the
    steadiest alarm (fewest re-raises, most coverage), then the smallest window and m."""
    rows = [(c, evaluate(clean, patched, c)) for n in range(1, max_n + 1) for k in range(1, n + 1)
            for m in range(1, max_n + 1) for c in [VotingConfig(k=k, n=n, m=m, propagate=False)]]
    rows.sort(key=lambda r: (r[1]["false_alarms_per_1000"], r[1]["frames_to_alarm_mean"], r[1]["re_raises"],
                             -r[1]["alarm_coverage"], r[0].n, r[0].m))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m realtime.live.voting --clean A.jsonl ... --patched B.jsonl ...``: rank k/n/m on replays
    recorded with ``--vote off`` (so every frame was analysed unmasked)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m realtime.live.voting", description=main.__doc__)
    p.add_argument("--clean", nargs="+", required=True, help="events of clean replays")
    p.add_argument("--patched", nargs="+", required=True, help="events of patched replays (ground truth known)")
    p.add_argument("--thresholds", default=None, help="comma-separated per-frame thresholds on the score "
                   "to evaluate instead of the recorded flags")
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    for thr in [None] if a.thresholds is None else [float(t) for t in a.thresholds.split(",")]:
        clean = [_segments(f, thr)[0] for f in a.clean]
        patched = [(fl, st) for fl, st in (_segments(f, thr) for f in a.patched) if st is not None]
        hits = sum(sum(fl[st:]) for fl, st in patched) / max(sum(len(fl) - st for fl, st in patched), 1)
        print(f"threshold {'recorded' if thr is None else thr}: clean frames {sum(map(len, clean))} "
              f"({sum(map(sum, clean))} flagged); patched replays {len(patched)}, per-frame detection {hits:.3f}")
        print("  k/n/m  FA/1000  to-alarm(mean,max)  coverage  re-raises")
        for cfg, r in tune(clean, patched, a.max_n)[: a.top]:
            print(f"  {cfg.k}/{cfg.n}/{cfg.m}  {r['false_alarms_per_1000']:7.2f}  {r['frames_to_alarm_mean']:6.2f} "
                  f"{r['frames_to_alarm_max']:4d}  {r['alarm_coverage']:8.3f}  {r['re_raises']:3d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
