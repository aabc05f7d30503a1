"""The live pipeline's one compute step: any registered defense, temporal voting, failure policy, timers.

``DefenseStep(defense, ...).step(x) -> StepResult`` is the only place the live pipeline runs a
defense; ``--defense none`` is the ``NoDefense`` baseline through the same step. Per frame:

1. when the alarm is on and the defense takes a prior (Z-Mask), the voter's propagated region is
   passed as a keep-mask so the first pass already sees the carried mask;
2. the defense runs (``ZMaskDefense.run``: first pass with taps -> detect -> shield -> second pass on
   flagged frames only), its stages timed into ``backbone`` / ``defense`` / ``second_pass``;
3. its flag (and fresh mask) goes through the k-of-n voter, so the alarm means the same thing
   whichever defense raised it;
4. a failing defense follows the policy: fail-open (default) emits the plain, UNdefended output
   with the error recorded; fail-closed (``--fail-closed``) marks the frame unsafe and emits nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Protocol

import numpy as np
import torch

from realtime.core.labels import label_map
from realtime.core.types import StageTimer
from realtime.defenses.base import Defense

from .clock import Clock
from .sinks.boxes import Boxes, to_boxes
from .voting import TemporalVoter, VotingConfig

# Defense-internal stage names reported under one ``defense`` stage in events and the summary
# (benchmarks.latency times them one by one); ``backbone`` and ``second_pass`` keep their names.
OWN_STAGES = ("backbone", "second_pass")


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


class Step(Protocol):
    """What ``run_pipeline`` calls once per frame."""

    def step(self, x: torch.Tensor) -> StepResult: ...


def to_label(logits: Any) -> np.ndarray:
    """HxW int class map from (1,C,H,W) logits (or a dict/tuple whose first tensor they are)."""
    if isinstance(logits, dict):
        logits = next(iter(logits.values()))
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return label_map(logits)[0].to("cpu").numpy()


def decode(output: Any, task: str = "segmentation") -> Dict[str, Any]:
    """The frame's output as StepResult fields: ``label`` for segmenters, ``boxes`` for detectors."""
    return {"label": None, "boxes": to_boxes(output)} if task == "detection" else {"label": to_label(output)}


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


class DefenseStep:
    """``step(x) -> StepResult`` around any ``Defense``; ``plain`` is the undefended forward for fail-open."""

    def __init__(self, defense: Defense, voting: VotingConfig, device: torch.device, fail_closed: bool = False,
                 plain: Optional[Callable[[torch.Tensor], Any]] = None, task: str = "segmentation",
                 audit: bool = False) -> None:
        self.defense, self.clock, self.fail_closed, self.task = defense, Clock(device), fail_closed, task
        self.voter = TemporalVoter(voting)
        self.plain = plain if plain is not None else defense.plain
        self.audit = audit            # also analyse the UNmasked frame when propagation masked it (2x cost)

    def _timer(self, st: Dict[str, float]) -> StageTimer:
        @contextmanager
        def timer(stage: str) -> Iterator[None]:
            key = stage if stage in OWN_STAGES else "defense"
            t0 = self.clock()
            try:
                yield
            finally:
                st[key] = st.get(key, 0.0) + self.clock() - t0
        return timer

    def _grad_mode(self) -> Any:
        # Gradient-based defenses (SLGS, WLGS, TaintRadar) need autograd; the rest run without it.
        return torch.enable_grad() if self.defense.needs_grad else torch.inference_mode()

    def step(self, x: torch.Tensor) -> StepResult:
        st: Dict[str, float] = {}
        try:
            with self._grad_mode():
                return self._step(x, st)
        except Exception as exc:  # the policy decides what a failed defense means for this frame
            return self._failed(x, st, _message(exc))

    def _step(self, x: torch.Tensor, st: Dict[str, float]) -> StepResult:
        prop = self.voter.propagated() if self.defense.accepts_prior else None
        prior = 1.0 - prop if prop is not None else None
        res = self.defense(x, self._timer(st), prior=prior)
        raw_flagged = None
        if self.audit and prop is not None:
            raw_flagged = bool(self.defense(x).flagged[0])
        t0 = self.clock()
        flagged = bool(res.flagged[0]) if res.flagged is not None else False   # maskers never alarm
        carried = prop is not None and not flagged
        fresh = None
        if flagged and self.defense.accepts_prior:
            fresh = 1.0 - res.extras.get("detected_mask", res.mask)
        vs = self.voter.update(flagged, fresh, carried)
        st["vote"] = self.clock() - t0
        t1 = self.clock()
        out = decode(res.output, self.task)
        masked = None
        if res.mask is not None:
            m = res.mask[0, 0].detach() < 0.5
            masked = m.to("cpu").numpy() if bool(m.any()) else None
        score = float(res.score[0]) if res.score is not None else None
        st["postprocess"] = self.clock() - t1
        return StepResult(**out, masked=masked, score=score, flagged=flagged, carried=carried,
                          propagated=prop is not None,
                          second_pass=res.first_output is not None and res.first_output is not res.output,
                          raw_flagged=raw_flagged, alarm=vs.alarm, raised=vs.raised, cleared=vs.cleared, stages=st)

    def _failed(self, x: torch.Tensor, st: Dict[str, float], msg: str) -> StepResult:
        alarm = self.voter.alarm
        if self.fail_closed:
            return StepResult(label=None, unsafe=True, error=msg, alarm=alarm, stages=st)
        try:
            t0 = self.clock()
            with torch.inference_mode():
                out = decode(self.plain(x), self.task)
            st["backbone"] = st.get("backbone", 0.0) + self.clock() - t0
            return StepResult(**out, error=msg, alarm=alarm, stages=st)
        except Exception as exc2:  # not even the plain model runs: nothing trustworthy to emit
            return StepResult(label=None, unsafe=True, error=f"{msg}; plain pass: {exc2}"[:300], alarm=alarm,
                              stages=st)


__all__ = ["DefenseStep", "OWN_STAGES", "Step", "StepResult", "decode", "to_label"]
