"""Multi-stream live runs (several --source, or a .streams file): one batched forward, one alarm state
and one set of outputs per stream, ``stream`` in every event, one summary with a part per stream."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from realtime import run as cli
from realtime.core.errors import UsageError
from realtime.live.multistream import expand_sources
from tests.test_pipeline_run import count_frames, make_video


def _lines(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _folder(path: Path, n: int, level: int) -> Path:
    path.mkdir()
    for k in range(n):
        Image.fromarray(np.full((50, 70, 3), (level + 30 * k) % 256, np.uint8)).save(path / f"{k}.png")
    return path


def test_two_source_flags_run_as_two_batched_streams_with_zmask(tmp_path, capsys):
    make_video(tmp_path / "a.mp4", 6)
    make_video(tmp_path / "b.mp4", 4, hw=(60, 80))
    out = tmp_path / "out.mp4"
    rc = cli.main(["--source", str(tmp_path / "a.mp4"), "--source", str(tmp_path / "b.mp4"), "--output", str(out),
                   "--imgsz", "96x128", "--quiet", "--vote", "2/3", "--threads", "1"])
    assert rc == 0
    assert count_frames(tmp_path / "out.s0.mp4") == 6 and count_frames(tmp_path / "out.s1.mp4") == 4
    for i, n in ((0, 6), (1, 4)):
        lines = _lines(tmp_path / f"out.s{i}.events.jsonl")
        assert all(e["stream"] == i for e in lines)                     # every line: run header, frames, alarms
        assert lines[0]["type"] == "run" and lines[0]["source"] == str(tmp_path / ("ab"[i] + ".mp4"))
        frames = [e for e in lines if e["type"] == "frame"]
        assert [e["frame"] for e in frames] == list(range(n)) and frames[0]["score"] is not None
        assert set(frames[0]["stages_ms"]) >= {"decode", "preprocess", "backbone", "defense", "vote", "sink"}
    s = json.loads((tmp_path / "out.summary.json").read_text())
    assert s["status"] == "complete" and s["frames"] == 10 and s["streams_count"] == 2
    assert [p["frames"] for p in s["streams"]] == [6, 4] and [p["stream"] for p in s["streams"]] == [0, 1]
    assert s["batches"] == 6 and s["mean_batch"] == pytest.approx(10 / 6, abs=1e-3)   # replays: never split
    assert s["streams"][1]["outputs"]["video"] == str(tmp_path / "out.s1.mp4")
    printed = capsys.readouterr().out
    assert "stream 0" in printed and "stream 1" in printed and "batches" in printed


def test_batched_zmask_matches_the_single_stream_run(tmp_path):
    make_video(tmp_path / "a.mp4", 5)
    make_video(tmp_path / "b.mp4", 5, hw=(60, 80))
    common = ["--imgsz", "96x128", "--quiet", "--vote", "1/1", "--output", "none", "--threads", "1"]
    assert cli.main(["--source", str(tmp_path / "a.mp4"), "--source", str(tmp_path / "b.mp4"),
                     "--events", str(tmp_path / "m.jsonl"), "--summary", str(tmp_path / "m.json")] + common) == 0
    assert cli.main(["--source", str(tmp_path / "b.mp4"), "--events", str(tmp_path / "one.jsonl"),
                     "--summary", str(tmp_path / "one.json")] + common) == 0
    multi = [e for e in _lines(tmp_path / "m.s1.jsonl") if e["type"] == "frame"]
    single = [e for e in _lines(tmp_path / "one.jsonl") if e["type"] == "frame"]
    assert "stream" not in single[0]                      # single-stream events are unchanged
    assert [e["flagged"] for e in multi] == [e["flagged"] for e in single]
    assert [e["alarm"] for e in multi] == [e["alarm"] for e in single]
    assert np.allclose([e["score"] for e in multi], [e["score"] for e in single], atol=1e-3)


def test_streams_file_and_per_stream_max_frames(tmp_path):
    a, b = _folder(tmp_path / "a", 5, 10), _folder(tmp_path / "b", 4, 200)
    spec = tmp_path / "cams.streams"
    spec.write_text(f"# two folders\n{a}\n\n{b}\n")
    assert expand_sources([str(spec)]) == [str(a), str(b)]
    rc = cli.main(["--source", str(spec), "--defense", "none", "--imgsz", "64x96", "--max-frames", "3",
                   "--output", str(tmp_path / "o.mp4"), "--quiet"])
    assert rc == 0
    s = json.loads((tmp_path / "o.summary.json").read_text())
    assert [p["frames"] for p in s["streams"]] == [3, 3] and s["defense"] == "none"
    assert all(p["stopped"] == "max-frames reached" for p in s["streams"])
    for i in range(2):
        assert count_frames(tmp_path / f"o.s{i}.mp4") == 3
        assert {e["stream"] for e in _lines(tmp_path / f"o.s{i}.events.jsonl")} == {i}


def test_streams_file_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="no such streams file"):
        expand_sources([str(tmp_path / "missing.streams")])
    (tmp_path / "empty.streams").write_text("# nothing\n")
    rc = cli.main(["--source", str(tmp_path / "empty.streams"), "--defense", "none", "--quiet"])
    assert rc == 2 and "lists no source" in capsys.readouterr().err


# ------------------------------------------------------------------ run_streams with fake sources
import threading  # noqa: E402
import time  # noqa: E402
from typing import Iterator  # noqa: E402

import torch  # noqa: E402

from realtime.live.multistream import run_streams  # noqa: E402
from realtime.live.pipeline import PipelineConfig  # noqa: E402
from realtime.live.sources import Frame, Source  # noqa: E402
from realtime.live.step import StepResult  # noqa: E402
from realtime.live.voting import TemporalVoter, VotingConfig  # noqa: E402


class _Src(Source):
    """``n`` frames (brightness = index), ``delay`` s apart."""

    def __init__(self, n: int, live: bool, delay: float = 0.0) -> None:
        self.n, self.live, self.delay, self.name, self.fps = n, live, delay, "fake", 10.0

    def __iter__(self) -> Iterator[Frame]:
        for k in range(self.n):
            time.sleep(self.delay)
            yield Frame(index=k, image=np.full((8, 8, 3), k, np.uint8), timestamp=k / 10)


class _BatchStep:
    """Records the batch sizes; ``delay`` s per call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: List[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def new_voter(self) -> TemporalVoter:
        return TemporalVoter(VotingConfig())

    def step_batch(self, x: torch.Tensor, voters) -> List[StepResult]:
        assert x.shape[0] == len(voters) and len({id(v) for v in voters}) == len(voters)
        self.sizes.append(x.shape[0])
        time.sleep(self.delay)
        return [StepResult(label=np.zeros((8, 8), np.uint8), score=float(x[i, 0, 0, 0]) * 255)
                for i in range(x.shape[0])]


def _run(sources, step, **cfg):
    seen = {i: [] for i in range(len(sources))}
    streams = run_streams(sources, step, lambda i, w, r: seen[i].append((w.frame.index, round(r.score))),
                          PipelineConfig(imgsz=(8, 8), **cfg), torch.device("cpu"))
    return streams, seen


def test_replayed_streams_are_frame_exact_and_batched_together():
    step = _BatchStep()
    streams, seen = _run([_Src(5, False), _Src(3, False)], step)
    assert seen[0] == [(k, k) for k in range(5)] and seen[1] == [(k, k) for k in range(3)]
    assert step.sizes == [2, 2, 2, 1, 1]
    assert [s.info.processed for s in streams] == [5, 3] and all(s.info.dropped == 0 for s in streams)


def test_a_slow_live_stream_does_not_hold_back_a_fast_one_and_stale_frames_are_dropped():
    step = _BatchStep(delay=0.02)
    streams, seen = _run([_Src(40, True, 0.002), _Src(3, True, 0.3)], step)
    assert len(seen[1]) == 3 and [k for k, _ in seen[1]] == [0, 1, 2]      # the slow camera: every frame
    fast = [k for k, _ in seen[0]]
    assert fast == sorted(fast) and fast[-1] == 39                          # newest frame wins ...
    assert streams[0].info.dropped > 0 and len(fast) + streams[0].info.dropped == 40   # ... drops counted
    assert 1 in step.sizes                                                  # batches went without the slow one
