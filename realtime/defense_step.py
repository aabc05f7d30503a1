"""The live pipeline's step for any registered defense (``--defense lgs|slgs|wlgs|patchzero|...``).

Z-Mask keeps its own step (``pipeline.ZMaskEngine``: mask propagation, second pass on flagged frames
only). Every other defense runs through its common interface (``realtime.defenses.base``): the
defense call is timed per stage, its keep-mask becomes the frame's masked region, and — for
defenses that flag — the per-frame flag goes through the same k-of-n temporal voter, so the alarm
means the same thing whichever defense raised it. A failing defense follows the fail-open /
fail-closed policy exactly as Z-Mask does.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator

import torch

from realtime.defenses.base import Defense
from realtime.pipeline import Clock, StepResult, decode
from realtime.voting import TemporalVoter, VotingConfig


class DefenseStep:
    """``step(x) -> StepResult`` around a ``Defense``; stage names are the defense's own."""

    def __init__(self, defense: Defense, voting: VotingConfig, device: torch.device, fail_closed: bool = False,
                 plain: Any = None, task: str = "segmentation") -> None:
        self.defense, self.clock, self.fail_closed, self.task = defense, Clock(device), fail_closed, task
        self.voter = TemporalVoter(voting)
        self.plain = plain if plain is not None else defense.model

    def _timer(self, st: Dict[str, float]):
        @contextmanager
        def timer(stage: str) -> Iterator[None]:
            t0 = self.clock()
            try:
                yield
            finally:
                st[stage] = st.get(stage, 0.0) + self.clock() - t0
        return timer

    def step(self, x: torch.Tensor) -> StepResult:
        st: Dict[str, float] = {}
        try:
            # Gradient-based defenses (SLGS, WLGS, TaintRadar) need autograd; the rest run without it.
            with torch.no_grad() if not self.defense.needs_grad else torch.enable_grad():
                res = self.defense(x, self._timer(st))
            t0 = self.clock()
            out = decode(res.output, self.task)
            masked = None
            if res.mask is not None:
                m = res.mask[0, 0].detach() < 0.5
                masked = m.to("cpu").numpy() if bool(m.any()) else None
            flagged = bool(res.flagged[0]) if res.flagged is not None else False   # maskers never alarm
            score = float(res.score[0]) if res.score is not None else None
            vs = self.voter.update(flagged)
            st["postprocess"] = self.clock() - t0
            return StepResult(**out, masked=masked, score=score, flagged=flagged,
                              second_pass=res.first_output is not None and res.first_output is not res.output,
                              alarm=vs.alarm, raised=vs.raised, cleared=vs.cleared, stages=st)
        except Exception as exc:  # the policy decides what a failed defense means for this frame
            msg = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
            if self.fail_closed:
                return StepResult(label=None, unsafe=True, error=msg, alarm=self.voter.alarm, stages=st)
            with self._timer(st)("backbone"), torch.no_grad():
                out = decode(self.plain(x), self.task)
            return StepResult(**out, error=msg, alarm=self.voter.alarm, stages=st)


__all__ = ["DefenseStep"]
