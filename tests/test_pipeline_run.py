"""Pipeline mechanics (overload, replay, limits, failure policy, propagation) and the CLI end to end."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, List

import av
import numpy as np
import pytest
import torch
from PIL import Image

from realtime import run as cli
from realtime.defenses import Detection
from realtime.defenses.zmask import ZMask
from realtime.defenses.zmask_defense import ZMaskDefense
from realtime.live.pipeline import PipelineConfig, run_pipeline
from realtime.live.step import DefenseStep, StepResult
from realtime.live.sources import Frame, Source
from realtime.live.voting import VotingConfig

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process runs cannot get the CLI's OMP_WAIT_POLICY=PASSIVE (torch is already loaded), and
    spinning OpenMP workers starve the pipeline threads on small machines: use one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeSource(Source):
    """``n`` 40x48 frames as fast as possible; frame k has brightness k."""

    def __init__(self, n: int, live: bool) -> None:
        self.n, self.live, self.name, self.fps = n, live, "fake", 10.0

    def __iter__(self) -> Iterator[Frame]:
        for k in range(self.n):
            yield Frame(index=k, image=np.full((40, 48, 3), k % 256, np.uint8), timestamp=k / 10)


class SlowEngine:
    """Reports the frame brightness back; takes ``delay`` seconds per frame."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def step(self, x: torch.Tensor) -> StepResult:
        time.sleep(self.delay)
        return StepResult(label=np.zeros((40, 48), np.uint8), score=float(x[0, 0, 0, 0]) * 255)


def _collect(source: Source, engine, cfg: PipelineConfig):
    seen: List[int] = []
    info = run_pipeline(source, engine, lambda w, r: seen.append(w.frame.index), cfg, CPU)
    return info, seen


def test_live_overload_keeps_newest_and_counts_drops():
    info, seen = _collect(FakeSource(60, live=True), SlowEngine(0.02), PipelineConfig(imgsz=None))
    assert info.read == 60 and info.dropped > 0
    assert len(seen) + info.dropped == 60                 # every frame is either processed or counted
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] == 59                                  # the newest frame always survives


def test_replay_is_frame_exact_under_overload():
    info, seen = _collect(FakeSource(25, live=False), SlowEngine(0.01), PipelineConfig(imgsz=None))
    assert seen == list(range(25)) and info.dropped == 0 and info.processed == 25


def test_max_frames_and_realtime_pacing_make_a_replay_live():
    info, seen = _collect(FakeSource(50, live=False), SlowEngine(0.0), PipelineConfig(imgsz=None, max_frames=7))
    assert seen == list(range(7)) and info.processed == 7
    info, seen = _collect(FakeSource(8, live=False), SlowEngine(0.0), PipelineConfig(imgsz=None, realtime=True))
    assert seen == list(range(8)) and info.wall_s >= 0.6  # paced at 10 fps (a lower bound, not a limit)


class StubZMask:
    """Z-Mask stand-in: 'detects' pixels equal to 1.0 in all channels; fills masked pixels with 0.5."""

    def __init__(self, fail_on: int = -1) -> None:
        self.cfg = SimpleNamespace(lambda0=0.5, check_finite=True)
        self.first_inputs: List[torch.Tensor] = []
        self.plain_inputs: List[torch.Tensor] = []
        self.fail_on, self.calls = fail_on, 0
        stub = self

        class Taps:
            def __call__(self, x):
                stub.first_inputs.append(x.clone())
                return stub._logits(x), {"x": x}

            def plain(self, x):
                stub.plain_inputs.append(x.clone())
                return stub._logits(x)

        self.taps = Taps()

    @staticmethod
    def _logits(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(1, 11, *x.shape[-2:])
        out[:, 3] = 1.0
        out[:, 0] = 2.0 * (x == 1.0).all(1).float()        # visible 'patch' pixels become class 0
        return out

    def heatmaps(self, taps):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected defense failure")
        h = (taps["x"] == 1.0).all(1, keepdim=True).float()
        return h, h

    def fusion(self, h_s, h_d):
        return h_s, h_s.amax(dim=(1, 2, 3))

    def input_mask(self, soft, flagged, size):
        return 1.0 - ((soft > 0.5) & flagged.view(-1, 1, 1, 1)).float()

    second_pass = ZMask.second_pass            # the real one, over the stub's plain pass

    def detect(self, taps, size, timer=None):  # same composition as ZMask.detect, over the stub's pieces
        h_s, h_d = self.heatmaps(taps)
        soft, score = self.fusion(h_s, h_d)
        flagged = score > self.cfg.lambda0
        return Detection(h_s, h_d, soft, score, flagged, self.input_mask(soft, flagged, size))

    def shield(self, x, keep):
        return x * keep + 0.5 * (1.0 - keep)


def _frame(patch: bool) -> torch.Tensor:
    x = torch.full((1, 3, 16, 16), 0.2)
    if patch:
        x[..., 4:8, 4:8] = 1.0
    return x


def test_propagation_masks_before_the_backbone_and_skips_the_second_pass():
    zm = StubZMask()
    eng = DefenseStep(ZMaskDefense(zm), VotingConfig(k=2, n=3, m=2, mask_window=2, dilate=1), CPU)
    patch = [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    res = [eng.step(_frame(bool(p))) for p in patch]
    assert [r.flagged for r in res] == [0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert [r.carried for r in res] == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0]
    assert [r.second_pass for r in res] == [r.flagged for r in res]
    assert [r.alarm for r in res] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]
    # frame 4: the first pass already saw the patch filled in (masked before the backbone) ...
    assert torch.all(zm.first_inputs[4][..., 3:9, 3:9] == 0.5)
    # ... so its output is the defended one with no second pass; flagged frames got one each
    assert len(zm.plain_inputs) == 3 and torch.all(zm.plain_inputs[0][..., 4:8, 4:8] == 0.5)
    assert all(r.label is not None and (r.label != 0).all() for r in res)   # the patch never shows
    assert res[4].masked is not None and res[4].masked[4:8, 4:8].all()


def test_evidence_alarms_on_scores_held_under_lambda0_and_skips_masked_frames():
    class Under(StubZMask):
        def fusion(self, h_s, h_d):                 # every frame scores 0.9 lambda0: never flagged
            return h_s * 0, torch.full((h_s.shape[0],), 0.45)

    plain = DefenseStep(ZMaskDefense(Under()), VotingConfig(k=2, n=3), CPU)
    withev = DefenseStep(ZMaskDefense(Under()), VotingConfig(k=2, n=3, evidence=4, evidence_ratio=0.8), CPU)
    a = [plain.step(_frame(True)) for _ in range(6)]
    b = [withev.step(_frame(True)) for _ in range(6)]
    assert not any(r.alarm or r.flagged for r in a) and all(r.evidence is None for r in a)
    assert [r.alarm for r in b] == [False] * 3 + [True] * 3 and not any(r.flagged for r in b)
    assert b[3].evidence == pytest.approx(0.9) and b[3].raised
    assert withev._ratios([0.45, 0.45], [None, torch.ones(1, 1, 4, 4)]) == [pytest.approx(0.9), None]


@pytest.mark.parametrize("fail_closed", [True, False])
def test_defense_failure_policy(fail_closed):
    zm = StubZMask(fail_on=2)
    eng = DefenseStep(ZMaskDefense(zm), VotingConfig(k=1, n=1, m=1), CPU, fail_closed=fail_closed)
    ok, bad = eng.step(_frame(False)), eng.step(_frame(True))
    assert ok.error is None and not ok.unsafe
    assert "injected defense failure" in bad.error
    if fail_closed:
        assert bad.unsafe and bad.label is None                   # nothing is emitted for the frame
    else:
        assert not bad.unsafe and (bad.label[4:8, 4:8] == 0).all()  # undefended pass-through


# ---------------------------------------------------------------- CLI


def make_video(path: Path, n: int, hw=(72, 96), fps: int = 10, faststart: bool = False) -> None:
    rng = np.random.default_rng(0)
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = hw[1], hw[0], "yuv420p"
    for _ in range(n):
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def count_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def events(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_video_file_with_zmask(tmp_path, capsys):
    make_video(tmp_path / "in.mp4", 6)
    out = tmp_path / "out.mp4"
    rc = cli.main(["--source", str(tmp_path / "in.mp4"), "--output", str(out), "--imgsz", "96x128",
                   "--quiet", "--vote", "2/3"])
    assert rc == 0
    assert count_frames(out) == 6
    ev = [e for e in events(tmp_path / "out.events.jsonl") if e["type"] == "frame"]
    assert [e["frame"] for e in ev] == list(range(6))
    for key in ("timestamp", "score", "alarm", "mask_box", "stages_ms", "latency_ms"):
        assert key in ev[0]
    assert set(ev[0]["stages_ms"]) >= {"decode", "preprocess", "backbone", "defense", "vote", "postprocess", "sink"}
    assert ev[1]["timestamp"] == pytest.approx(0.1)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["frames"] == 6 and summary["dropped"] == 0
    assert set(summary["latency_ms"]["end_to_end"]) == {"p50", "p95", "p99", "mean"}
    assert "summary: 6 frames" in capsys.readouterr().out


def test_cli_image_folder_without_display(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for k in range(4):
        Image.fromarray(np.full((50, 70, 3), 60 * k, np.uint8)).save(tmp_path / f"{k}.jpg")
    rc = cli.main(["--source", str(tmp_path), "--defense", "none", "--imgsz", "64x96", "--show",
                   "--output", str(tmp_path / "o.mp4"), "--events", str(tmp_path / "e.jsonl"), "--quiet"])
    assert rc == 0 and count_frames(tmp_path / "o.mp4") == 4
    err = capsys.readouterr().err
    assert "--show: no display" in err and "Traceback" not in err


def _one_line_error(capsys, argv: List[str], match: str) -> None:
    rc = cli.main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error:") and match in err[0], err


def test_cli_error_cases(tmp_path, capsys):
    (tmp_path / "zero.mp4").write_bytes(b"")
    make_video(tmp_path / "v.mp4", 20)
    data = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    gray, odd = tmp_path / "gray", tmp_path / "odd"
    gray.mkdir()
    odd.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(gray / "a.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd / "a.png")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(odd / "b.png")
    o = ["--output", str(tmp_path / "o.mp4")]
    _one_line_error(capsys, ["--source", "camera7"] + o, "camera 7")
    _one_line_error(capsys, ["--source", "rtsp://127.0.0.1:9/cam", "--timeout", "2"] + o, "cannot open stream")
    _one_line_error(capsys, ["--source", str(tmp_path / "zero.mp4")] + o, "empty (0 bytes)")
    _one_line_error(capsys, ["--source", str(tmp_path / "cut.mp4")] + o, "truncated or not a video")
    _one_line_error(capsys, ["--source", str(gray)] + o, "grayscale")
    _one_line_error(capsys, ["--source", str(odd)] + o, "must share one size")
    _one_line_error(capsys, ["--source", str(tmp_path / "v.mp4"), "--engine", "tensorrt"] + o, "is not available")
    _one_line_error(capsys, ["--source", str(tmp_path / "v.mp4"), "--vote", "4/3"] + o, "k <= n")
    _one_line_error(capsys, ["--source", str(tmp_path / "v.mp4"), "--evidence", "8"] + o, "--evidence expects N:R")
    cal = REPO / "calibration" / "shipped" / "ddrnet23_slim.safetensors"
    if cal.is_file():
        _one_line_error(capsys, ["--source", str(tmp_path / "v.mp4"), "--model", "bisenetv1",
                                 "--calibration", str(cal)] + o, "calibration was made for model 'ddrnet23_slim'")
    assert not (tmp_path / "o.mp4").exists()


def test_cli_source_dying_mid_stream_leaves_a_playable_video(tmp_path, capsys):
    make_video(tmp_path / "v.mp4", 40, faststart=True)
    data = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    rc = cli.main(["--source", str(tmp_path / "cut.mp4"), "--defense", "none", "--imgsz", "64x96",
                   "--output", str(tmp_path / "o.mp4"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert rc == 3 and len(err) == 1 and err[0].startswith("error:") and "cut.mp4" in err[0]
    assert 0 < summary["frames"] < 40 and count_frames(tmp_path / "o.mp4") == summary["frames"]


def test_ctrl_c_finishes_the_output(tmp_path):
    make_video(tmp_path / "long.mp4", 300, fps=5)      # 60 s of paced replay: SIGINT lands mid-run even under load
    out, ev = tmp_path / "o.mp4", tmp_path / "o.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "realtime.run", "--source", str(tmp_path / "long.mp4"),
                          "--realtime", "--defense", "none", "--imgsz", "64x96", "--output", str(out),
                          "--events", str(ev), "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not ev.exists() or len(ev.read_text().splitlines()) < 6):  # header + 5
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err
    n = len([e for e in events(ev) if e["type"] == "frame"])
    assert 5 <= n < 300 and count_frames(out) == n


def test_demo_bar_short(camvid_root, tmp_path):
    out = tmp_path / "demo.mp4"
    code, s = cli.run(cli.config_from_args(cli.parse_args(["--source", "demo", "--max-frames", "36", "--output", str(out),
                                      "--events", str(tmp_path / "ev.jsonl"), "--quiet"])))
    assert code == 0 and s["frames"] == 36 and count_frames(out) == 36
    g = s["ground_truth"]
    assert g["patched_frames"] == 6 and g["clean_before_patch"]["frames"] == 30
    assert g["clean_before_patch"]["alarm_frames"] == 0
    assert 0.0 <= g["mask_iou_mean"] <= 1.0 and "detection_rate" in g
