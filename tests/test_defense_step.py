"""Baseline defenses in the live pipeline: ``DefenseStep`` (voting, masks, failure policy) and the CLI."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from realtime import run as cli
from realtime.live.step import DefenseStep
from realtime.defenses.base import Defense, DefenseResult
from realtime.live.voting import VotingConfig


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], 1 - x[:, :1]], 1)          # 2-class "logits"


class _Flagger(Defense):
    """Flags every frame whose mean is above 0.5 and masks its left half."""
    name, masks, flags = "fake", True, True

    def run(self, x, timer):
        with timer("detector"):
            flag = x.mean(dim=(1, 2, 3)) > 0.5
            keep = torch.ones_like(x[:, :1])
            keep[..., : x.shape[-1] // 2] = (~flag).float().view(-1, 1, 1)
        with timer("second_pass"):
            out = self.model(x * keep)
        return DefenseResult(output=out, defended_input=x * keep, mask=keep, flagged=flag, score=x.mean((1, 2, 3)),
                             first_output=None)


class _Broken(_Flagger):
    def run(self, x, timer):
        raise RuntimeError("boom")


def test_flags_go_through_the_voter_and_masks_reach_the_result():
    step = DefenseStep(_Flagger(_Tiny()), VotingConfig(k=2, n=3, m=2), torch.device("cpu"))
    bright, dark = torch.full((1, 3, 8, 8), 0.9), torch.full((1, 3, 8, 8), 0.1)
    r1, r2, r3 = step.step(bright), step.step(bright), step.step(dark)
    assert r1.flagged and not r1.alarm                  # one vote of 2 needed
    assert r2.alarm and r2.raised
    assert r1.masked is not None and r1.masked[:, :4].all() and not r1.masked[:, 4:].any()
    assert not r3.flagged and r3.masked is None and r3.alarm      # hysteresis: one clean frame keeps it
    assert set(r1.stages) >= {"defense", "second_pass", "postprocess"}   # defense-internal stages: one "defense"
    assert r1.label.shape == (8, 8) and abs(r1.score - 0.9) < 1e-6


def test_failure_policy():
    x = torch.full((1, 3, 8, 8), 0.9)
    fail_open = DefenseStep(_Broken(_Tiny()), VotingConfig(), torch.device("cpu")).step(x)
    assert fail_open.label is not None and "boom" in fail_open.error and not fail_open.unsafe
    closed = DefenseStep(_Broken(_Tiny()), VotingConfig(), torch.device("cpu"), fail_closed=True).step(x)
    assert closed.label is None and closed.unsafe


def test_lgs_through_the_cli(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        img = np.full((72, 96, 3), 120, np.uint8)
        img[20:50, 30:70] = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)   # high-frequency "patch"
        Image.fromarray(img).save(frames / f"{k:03d}.png")
    out = tmp_path / "lgs.mp4"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main(["--source", str(frames), "--imgsz", "72x96", "--defense", "lgs", "--output", str(out),
                       "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["defense"] == "lgs"
    events = [json.loads(line) for line in out.with_suffix(".events.jsonl").read_text().splitlines()]
    frames_ev = [e for e in events if e["type"] == "frame"]
    assert len(frames_ev) == 2
    assert all(e["mask_frac"] > 0.05 for e in frames_ev)          # LGS masks the noisy block
    assert not any(e["alarm"] for e in frames_ev)                  # a masker never raises the alarm
