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
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence

import numpy as np
import torch

from realtime.core.labels import label_map
from realtime.core.types import StageTimer
from realtime.defenses.base import Defense

from .clock import Clock, Timings
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
    evidence: Optional[float] = None      # --evidence: the window's mean score / lambda0 (when full)
    unsafe: bool = False
    error: Optional[str] = None
    stages: Dict[str, float] = field(default_factory=dict)
    boxes: Optional[Boxes] = None
    timings: Optional[Timings] = None     # CUDA: stage events still to be read (``resolve_stages``)

    def resolve_stages(self) -> Dict[str, float]:
        """``stages`` with the pending CUDA stage spans read in (off the compute thread in the pipeline)."""
        if self.timings is not None:
            self.stages = {**self.stages, **self.timings.result()}
            self.timings = None
        return self.stages


class Step(Protocol):
    """What ``run_pipeline`` calls once per frame."""

    def step(self, x: torch.Tensor) -> StepResult: ...

    def step_batch(self, x: torch.Tensor, voters: Sequence[TemporalVoter]) -> List[StepResult]: ...

    def new_voter(self) -> TemporalVoter: ...


def _rows(output: Any, n: int) -> List[Any]:
    """A batched model output split into ``n`` single-frame outputs of the same form."""
    if n == 1:
        return [output]
    if isinstance(output, torch.Tensor):
        return [output[i:i + 1] for i in range(n)]
    if isinstance(output, dict):
        parts = {k: _rows(v, n) for k, v in output.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    if isinstance(output, (list, tuple)) and len(output) == n and all(isinstance(o, dict) for o in output):
        return [[o] for o in output]             # a detector: one dict per image
    if isinstance(output, (list, tuple)):
        parts = [_rows(v, n) for v in output]
        return [type(output)(p[i] for p in parts) for i in range(n)]
    raise TypeError(f"cannot split a model output of type {type(output).__name__} by frame")


def to_label(logits: Any) -> np.ndarray:
    """HxW int class map from (1,C,H,W) logits (or a dict/tuple whose first tensor they are)."""
    return to_labels(logits)[0]


def to_labels(logits: Any) -> np.ndarray:
    """(N,H,W) uint8 class maps: argmax on the logits' device, only the uint8 maps come to the host."""
    if isinstance(logits, dict):
        logits = next(iter(logits.values()))
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return label_map(logits).to("cpu").numpy()


def decode(output: Any, task: str = "segmentation") -> Dict[str, Any]:
    """The frame's output as StepResult fields: ``label`` for segmenters, ``boxes`` for detectors."""
    return {"label": None, "boxes": to_boxes(output)} if task == "detection" else {"label": to_label(output)}


def decode_batch(output: Any, n: int, task: str = "segmentation") -> List[Dict[str, Any]]:
    """``decode`` for each of the ``n`` frames of a batched output (one host copy for segmenters)."""
    if task == "detection":
        return [decode(o, task) for o in _rows(output, n)]
    return [{"label": lab} for lab in to_labels(output)]


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


class DefenseStep:
    """``step(x) -> StepResult`` around any ``Defense``; ``plain`` is the undefended forward for fail-open.

    ``step_batch(x, voters)`` runs one batched defense call over frames of several streams, row ``i``
    voted by ``voters[i]`` (each stream's own alarm state and propagation ring); ``step`` is the
    single-stream case with the step's own voter. Stage times are per call (a batch's rows share them)."""

    def __init__(self, defense: Defense, voting: VotingConfig, device: torch.device, fail_closed: bool = False,
                 plain: Optional[Callable[[torch.Tensor], Any]] = None, task: str = "segmentation",
                 audit: bool = False, clock: Optional[Clock] = None) -> None:
        self.defense, self.fail_closed, self.task = defense, fail_closed, task
        self.clock = clock if clock is not None else Clock(device)
        self.voting = voting
        self.voter = TemporalVoter(voting)
        self.plain = plain if plain is not None else defense.plain
        self.audit = audit            # also analyse the UNmasked frame when propagation masked it (2x cost)

    def new_voter(self) -> TemporalVoter:
        """A fresh alarm state for one more stream."""
        return TemporalVoter(self.voting)

    def _timer(self, tm: Timings) -> StageTimer:
        @contextmanager
        def timer(stage: str) -> Iterator[None]:
            key = stage if stage in OWN_STAGES else "defense"
            t0 = self.clock.mark()
            try:
                yield
            finally:
                tm.add(key, t0, self.clock.mark())
        return timer

    def _grad_mode(self) -> Any:
        # Gradient-based defenses (SLGS, WLGS, TaintRadar) need autograd; the rest run without it.
        return torch.enable_grad() if self.defense.needs_grad else torch.inference_mode()

    def step(self, x: torch.Tensor) -> StepResult:
        return self.step_batch(x, [self.voter])[0]

    def step_batch(self, x: torch.Tensor, voters: Sequence[TemporalVoter]) -> List[StepResult]:
        if x.shape[0] != len(voters):
            raise ValueError(f"a batch of {x.shape[0]} frames needs as many voters, got {len(voters)}")
        tm = Timings()
        try:
            with self._grad_mode():
                results = self._step(x, voters, tm)
        except Exception as exc:  # the policy decides what a failed defense means for these frames
            results = self._failed(x, voters, tm, _message(exc))
        pending = tm if self.clock.events else None
        stages = {} if pending is not None else tm.result()
        for r in results:
            r.stages, r.timings = dict(stages), pending
        return results

    def _prior(self, props: List[Optional[torch.Tensor]], x: torch.Tensor) -> Optional[torch.Tensor]:
        if all(p is None for p in props):
            return None
        ones = None
        rows = []
        for p in props:
            if p is None:
                ones = ones if ones is not None else torch.ones((1, 1, *x.shape[-2:]), device=x.device)
            rows.append(1.0 - p if p is not None else ones)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def _ratios(self, scores: Sequence[Optional[float]], props: Sequence[Optional[torch.Tensor]]) -> List[Optional[float]]:
        """score / lambda0 of the rows whose first pass ran unmasked (the evidence window's input), else None."""
        cfg = getattr(getattr(self.defense, "zm", None), "cfg", None)
        lam = getattr(cfg, "lambda0", None)
        if not self.voting.evidence or not lam or lam <= 0:
            return [None] * len(props)
        return [None if p is not None or s is None else float(s) / float(lam) for s, p in zip(scores, props)]

    def _step(self, x: torch.Tensor, voters: Sequence[TemporalVoter], tm: Timings) -> List[StepResult]:
        n = x.shape[0]
        motion = self.voting.motion and self.voting.propagate and self.defense.accepts_prior
        if motion:              # move each stream's carried masks with its scene before they are applied
            t0 = self.clock.mark(host=True)
            for i, voter in enumerate(voters):
                voter.follow(x[i])
            tm.add("vote", t0, self.clock.mark(host=True))
        props = [v.propagated() if self.defense.accepts_prior else None for v in voters]
        prior = self._prior(props, x)
        res = self.defense(x, self._timer(tm), prior=prior)
        raw = None
        if self.audit and prior is not None:
            raw = [bool(f) for f in self.defense(x).flagged.tolist()]
        t0 = self.clock.mark(host=True)
        flags = [bool(f) for f in res.flagged.tolist()] if res.flagged is not None else [False] * n  # maskers never alarm
        detected = res.extras.get("detected_mask", res.mask) if self.defense.accepts_prior else None
        votes = []
        scores = res.score.tolist() if res.score is not None else [None] * n    # one host copy for votes and results
        ratios = self._ratios(scores, props)
        for i, (voter, prop, flagged) in enumerate(zip(voters, props, flags)):
            fresh = 1.0 - detected[i:i + 1] if flagged and detected is not None else None
            votes.append(voter.update(flagged, fresh, prop is not None and not flagged,
                                      frame=x[i] if motion else None, ratio=ratios[i]))
        tm.add("vote", t0, self.clock.mark(host=True))
        t1 = self.clock.mark()
        outs = decode_batch(res.output, n, self.task)
        masked: List[Optional[np.ndarray]] = [None] * n
        if res.mask is not None:
            m = (res.mask[:, 0].detach() < 0.5).to("cpu").numpy()
            masked = [m[i] if m[i].any() else None for i in range(n)]
        tm.add("postprocess", t1, self.clock.mark())
        ran = res.first_output is not None and res.first_output is not res.output
        only_flagged = getattr(self.defense, "second_pass_flagged_only", False)   # Z-Mask: per-row second pass
        return [StepResult(**outs[i], masked=masked[i], score=None if scores[i] is None else float(scores[i]),
                           flagged=flags[i], carried=props[i] is not None and not flags[i],
                           propagated=props[i] is not None,
                           second_pass=ran and (n == 1 or flags[i] or not only_flagged),
                           raw_flagged=raw[i] if raw is not None and props[i] is not None else None,
                           alarm=votes[i].alarm, raised=votes[i].raised, cleared=votes[i].cleared,
                           evidence=votes[i].evidence)
                for i in range(n)]

    def _failed(self, x: torch.Tensor, voters: Sequence[TemporalVoter], tm: Timings, msg: str) -> List[StepResult]:
        alarms = [v.alarm for v in voters]
        if self.fail_closed:
            return [StepResult(label=None, unsafe=True, error=msg, alarm=a) for a in alarms]
        try:
            t0 = self.clock.mark()
            with torch.inference_mode():
                outs = decode_batch(self.plain(x), x.shape[0], self.task)
            tm.add("backbone", t0, self.clock.mark())
            return [StepResult(**o, error=msg, alarm=a) for o, a in zip(outs, alarms)]
        except Exception as exc2:  # not even the plain model runs: nothing trustworthy to emit
            return [StepResult(label=None, unsafe=True, error=f"{msg}; plain pass: {exc2}"[:300], alarm=a)
                    for a in alarms]


__all__ = ["DefenseStep", "OWN_STAGES", "Step", "StepResult", "decode", "decode_batch", "to_label", "to_labels"]
