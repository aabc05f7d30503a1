"""The fresh-machine path: no CamVid anywhere, ``--source demo`` runs on the clip embedded in the repository.

``REALTIME_NO_DATA=1`` switches the dataset lookup off (``$REALTIME_DATA`` and ``../shared`` relative to
the working directory and the repository), so these tests prove that path on every machine, CamVid or not.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.data import DataNotFoundError, resolve_data_dir
from realtime.live.sources import SourceError
from realtime.live.sources.demo import DemoConfig, DemoSource
from realtime.live.sources.demo_clip import CLIP_DIR, ClipView

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_data(monkeypatch):
    monkeypatch.delenv("REALTIME_DATA", raising=False)
    monkeypatch.setenv("REALTIME_NO_DATA", "1")


def test_lookup_switch(no_data, tiny_camvid, monkeypatch):
    with pytest.raises(DataNotFoundError, match="REALTIME_NO_DATA"):
        resolve_data_dir(None)
    monkeypatch.setenv("REALTIME_DATA", str(tiny_camvid))          # switched off: ignored too
    with pytest.raises(DataNotFoundError, match="REALTIME_NO_DATA"):
        resolve_data_dir(None)
    assert resolve_data_dir(tiny_camvid) == tiny_camvid.resolve()  # an explicit --data still counts
    monkeypatch.setenv("REALTIME_NO_DATA", "0")
    assert resolve_data_dir(None) == tiny_camvid.resolve()


def test_clip_is_intact_and_small():
    meta = json.loads((CLIP_DIR / "clip.json").read_text())
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((CLIP_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in CLIP_DIR.iterdir()) < 10e6
    assert "research use" in (CLIP_DIR / "README.md").read_text().lower()      # origin and licence note
    view = ClipView()
    assert len(view) == 101 and view.frames[:2] == [7959, 7961]
    n = 0
    for number, img, lab in view:
        assert img.shape == (360, 480, 3) and img.dtype == np.uint8 and lab.shape == (360, 480)
        assert lab.min() >= 0 and lab.max() <= 11
        n += 1
        if n == 3:
            break


def test_demo_source_falls_back_to_the_clip(no_data):
    src = DemoSource(DemoConfig())
    assert src.info["demo_frames"] == "embedded clip" and src.info["recorded_track"]
    assert src.length == 101 >= 100 and src.fps == 15.0
    frames = []
    for f in src:
        frames.append(f)
        if f.index == 33:
            break
    assert not any(f.gt_mask.any() for f in frames[:30])
    assert all(f.gt_mask.mean() > 0.03 for f in frames[30:])             # ground-truth masks come along
    assert frames[31].timestamp == pytest.approx(31 * 2 / 30)
    # other settings: no recorded track, the renderer tracks on the decoded frames itself
    other = DemoSource(DemoConfig(patch_start=2, patch_frames=3))
    assert not other.info["recorded_track"]
    masks = [f.gt_mask.any() for _, f in zip(range(6), other)]
    assert masks == [False, False, True, True, True, False]


def test_demo_needs_data_it_cannot_embed(no_data, monkeypatch, tmp_path):
    with pytest.raises(SourceError, match="not found"):
        DemoSource(DemoConfig(sequence="0006R0", split=None))              # only 0016E5 is embedded
    monkeypatch.setenv("REALTIME_NO_DATA", "")
    monkeypatch.setenv("REALTIME_DATA", str(tmp_path))                      # a wrong explicit root stays an error
    with pytest.raises(SourceError, match="REALTIME_DATA"):
        DemoSource(DemoConfig())


def test_run_with_no_dataset_anywhere(tmp_path):
    """`python -m realtime.run` (default source: demo) from a folder with no ../shared, lookup off."""
    env = {k: v for k, v in os.environ.items() if k != "REALTIME_DATA"}
    env.update(REALTIME_NO_DATA="1", PYTHONPATH=str(REPO))
    work = tmp_path / "w"
    work.mkdir()
    out, ev = work / "demo.mp4", work / "events.jsonl"
    p = subprocess.run([sys.executable, "-m", "realtime.run", "--max-frames", "42", "--output", str(out),
                        "--events", str(ev), "--quiet", "--threads", "2"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "embedded clip" in p.stdout
    s = json.loads((work / "demo.summary.json").read_text())
    assert s["source_info"]["demo_frames"] == "embedded clip" and s["frames"] == 42
    g = s["ground_truth"]
    assert g["patched_frames"] == 12 and g["clean_before_patch"]["alarm_frames"] == 0
    frames = [json.loads(line) for line in ev.read_text().splitlines()]
    frames = [e for e in frames if e["type"] == "frame"]
    assert any(e["alarm"] and e["gt_patch"] for e in frames)         # patched frames raise the alarm
    assert not any(e["alarm"] for e in frames[:30])
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 42
