"""``python -m realtime.run --engine NAME --precision P``: the backbone runs in the chosen engine.

A tiny image folder goes through the CLI with onnxruntime (plain and with Z-Mask); the Z-Mask scores
must equal those of the eager torch engine on the same frames (to the events' 5 decimals, +-1e-4).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from engines import available_engines
from realtime import run as cli


@pytest.fixture(autouse=True)
def setup(monkeypatch, tmp_path):
    """One torch thread (in-process runs cannot get the CLI's OMP policy) and a private engine cache."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("REALTIME_ENGINE_CACHE", str(tmp_path / "engine-cache"))
    yield
    torch.set_num_threads(before)


def _frames(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:96]
    for k in range(n):
        img = np.stack([yy * 2 + 20 * k, xx * 2, 255 - yy * 3], -1).clip(0, 255).astype(np.uint8)
        img[20:40, 30:60] = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)     # a noisy "patch"
        Image.fromarray(img).save(folder / f"{k:03d}.png")
    return folder


def _run(tmp_path: Path, name: str, extra: List[str]) -> dict:
    out = tmp_path / f"{name}.mp4"
    rc = cli.main(["--source", str(tmp_path / "frames"), "--imgsz", "96x128", "--output", str(out), "--quiet",
                   "--threads", "1", *extra])
    assert rc == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    frames = [json.loads(line) for line in out.with_suffix(".events.jsonl").read_text().splitlines()]
    summary["_frames"] = [e for e in frames if e["type"] == "frame"]
    return summary


def test_onnxruntime_engine_through_the_cli(tmp_path, capsys):
    _frames(tmp_path / "frames")
    plain = _run(tmp_path, "plain", ["--engine", "onnxruntime", "--defense", "none"])
    assert plain["frames"] == 3 and plain["engine"]["engine"] == "onnxruntime"
    assert plain["engine"]["layers"] == [] and plain["engine"]["input_shape"] == [96, 128]
    assert all(e["score"] is None for e in plain["_frames"])
    ort = _run(tmp_path, "ort", ["--engine", "onnxruntime"])
    eager = _run(tmp_path, "eager", ["--engine", "torch"])
    assert ort["engine"]["engine"] == "onnxruntime" and eager["engine"]["engine"] == "torch"
    assert ort["engine"]["layers"] == eager["engine"]["layers"] and len(ort["engine"]["layers"]) == 3
    assert Path(ort["engine"]["onnx"]).is_relative_to(tmp_path / "engine-cache")
    scores_ort = [e["score"] for e in ort["_frames"]]
    scores_eager = [e["score"] for e in eager["_frames"]]
    assert len(scores_ort) == 3 and scores_ort == pytest.approx(scores_eager, abs=1e-4)
    assert [e["flagged"] for e in ort["_frames"]] == [e["flagged"] for e in eager["_frames"]]
    assert "summary: 3 frames" in capsys.readouterr().out


def _one_line_error(capsys, argv: List[str], match: str) -> None:
    rc = cli.main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --engine") and match in err[0], err


def test_unavailable_engine_or_precision_is_a_usage_error(tmp_path, capsys):
    _frames(tmp_path / "frames", 1)
    base = ["--source", str(tmp_path / "frames"), "--imgsz", "64x64", "--output", str(tmp_path / "o.mp4")]
    ok, why = available_engines()["tensorrt"]
    if not ok:
        _one_line_error(capsys, base + ["--engine", "tensorrt"], why.split(":")[0])
    _one_line_error(capsys, base + ["--engine", "onnxruntime", "--precision", "bf16"],
                    "supports precision fp32, fp16, not bf16")
    if not torch.cuda.is_available():
        _one_line_error(capsys, base + ["--precision", "fp16", "--defense", "none"],
                        "fp16 autocast needs a CUDA device")
    assert not (tmp_path / "o.mp4").exists()
