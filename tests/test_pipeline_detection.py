"""The live pipeline with a detector (``--model fcos_ddrnet``): boxes in events and video, Z-Mask and
baselines on a detector, and the clear refusal of engines that cannot carry box outputs.

Untrained detectors (``--weights none`` / a saved random init) keep these tests independent of the
detector training run; their scores sit near 0.1, so tests that need boxes use ``--box-threshold 0``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from realtime.defenses.artifact import Calibration
from realtime import run as cli
from realtime.live.build import build
from realtime.defenses import ChannelStats, FusionBlock, SPRConfig, ZMaskConfig
from realtime.core.taps import ActivationTaps
from realtime.models import build_model, fingerprint, save_weights
from realtime.live.pipeline import PipelineConfig, run_pipeline
from realtime.live.step import StepResult
from realtime.live.sinks.boxes import BOX_COLORS, Boxes, box_records, draw_boxes
from realtime.live.sinks.video import annotate
from realtime.live.sources import SourceOptions, open_source
from realtime.live.voting import VotingConfig

CPU = torch.device("cpu")
HW = (96, 128)
IMGSZ = f"{HW[0]}x{HW[1]}"
NAMES = ("car", "pedestrian", "bicyclist", "sign/symbol")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: in-process runs share the machine with the pipeline's own threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_frames(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(folder / f"{k:02d}.jpg")
    return folder


def camvid_frames(root: Path, folder: Path, n: int = 3) -> Path:
    """The first ``n`` CamVid val frames, downsized to small JPEGs (one drive, in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(sorted((root / "val").glob("*.png"))[:n]):
        Image.open(path).convert("RGB").resize((128, 96)).save(folder / f"{k:02d}.jpg")
    return folder


def frame_events(path: Path) -> List[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["type"] == "frame"]


def run_cli(tmp_path: Path, frames: Path, *extra: str) -> dict:
    code, summary = cli.run(cli.config_from_args(cli.parse_args(
        ["--source", str(frames), "--model", "fcos_ddrnet", "--imgsz", IMGSZ, "--output", str(tmp_path / "o.mp4"),
         "--events", str(tmp_path / "e.jsonl"), "--quiet", *extra])))
    assert code == 0
    return summary


def check_box_events(ev: List[dict]) -> None:
    assert ev and all(isinstance(e["boxes"], list) for e in ev)
    for e in ev:
        for b in e["boxes"]:
            assert set(b) == {"label", "score", "box"} and isinstance(b["label"], str)
            assert 0.0 <= b["score"] <= 1.0 and len(b["box"]) == 4
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 <= x1 <= HW[1] and 0 <= y0 <= y1 <= HW[0]


@pytest.mark.parametrize("frames", ["synthetic", "camvid"])
def test_detector_without_defense_logs_boxes(frames, tmp_path, request):
    if frames == "camvid":
        folder = camvid_frames(request.getfixturevalue("camvid_root"), tmp_path / "in")   # skips without CamVid
    else:
        folder = synthetic_frames(tmp_path / "in")
    summary = run_cli(tmp_path, folder, "--weights", "none", "--defense", "none", "--box-threshold", "0")
    ev = frame_events(tmp_path / "e.jsonl")
    assert len(ev) == 3 and summary["frames"] == 3 and summary["task"] == "detection"
    check_box_events(ev)
    assert all(e["boxes"] for e in ev)                     # threshold 0: every kept detection is listed
    scores = [b["score"] for b in ev[0]["boxes"]]
    assert scores == sorted(scores, reverse=True)
    assert summary["class_names"] == list(NAMES) and summary["box_threshold"] == 0.0
    assert summary["detections"]["boxes"] == sum(len(e["boxes"]) for e in ev)


def test_box_threshold_filters_events(tmp_path):
    summary = run_cli(tmp_path, synthetic_frames(tmp_path / "in"), "--weights", "none", "--defense", "lgs",
                      "--box-threshold", "1.0")
    ev = frame_events(tmp_path / "e.jsonl")
    assert len(ev) == 3 and all(e["boxes"] == [] for e in ev)   # an untrained detector never scores 1.0
    assert summary["defense"] == "lgs" and summary["detections"]["frames_with_boxes"] == 0


def test_box_drawing_colours_a_known_box():
    boxes = Boxes(np.array([[20, 30, 70, 80], [5, 5, 15, 15]], np.float32), np.array([0.9, 0.2], np.float32),
                  np.array([1, 2], np.int64))
    shown = boxes.above(0.4)
    assert len(shown) == 1
    assert box_records(shown, NAMES) == [{"label": "car", "score": 0.9, "box": [20.0, 30.0, 70.0, 80.0]}]
    img = draw_boxes(np.zeros((96, 128, 3), np.uint8), shown, NAMES)
    car = np.all(img == BOX_COLORS[0], axis=-1)
    assert car[30:81, 20:71].any() and car[50, 20] and car[80, 45]        # the box's edges, in the car colour
    assert not car[:, 72:].any() and not car[82:].any()                    # nothing outside it
    assert not img[5:16, 5:16].any()                                       # the 0.2 box was not drawn
    panel = annotate(np.zeros((96, 128, 3), np.uint8), None, None, None, "off", "#0", "x", shown, NAMES)
    right = panel[28:, 128:]
    assert np.all(right == BOX_COLORS[0], axis=-1)[30:81, 20:71].any()


def detector_calibration(model: torch.nn.Module) -> Calibration:
    """A Z-Mask calibration of arbitrary values for ``model`` (channel counts read off one pass)."""
    spec = model.layers()
    cfg = ZMaskConfig(shallow=spec.shallow, deep=spec.deep, spr=SPRConfig.for_input(*HW, task="detection"),
                      lambda0=-1e9)          # every frame is flagged: exercises mask, second pass and voting
    with ActivationTaps(model, cfg.layers) as taps, torch.no_grad():
        _, maps = taps(torch.rand(1, 3, *HW))
    g = torch.Generator().manual_seed(0)
    chans = {n: m.shape[1] for n, m in maps.items()}
    stats = ChannelStats({n: torch.rand(c, generator=g) for n, c in chans.items()},
                         {n: torch.rand(c, generator=g) + 0.5 for n, c in chans.items()})
    return Calibration(model_name="fcos_ddrnet", fingerprint=fingerprint(model), input_size=HW, config=cfg,
                       stats=stats, fusion=FusionBlock().to_dict())


def test_zmask_on_a_detector_through_the_pipeline(tmp_path):
    torch.manual_seed(0)
    model = build_model("fcos_ddrnet", weights=None)
    weights = save_weights(model, tmp_path / "det.pt", half=False)        # the CLI reloads the same model
    cal = detector_calibration(model).save(tmp_path / "det.safetensors")
    folder = synthetic_frames(tmp_path / "in")
    argv = ["--source", str(folder), "--model", "fcos_ddrnet", "--weights", str(weights), "--calibration", str(cal),
            "--vote", "1/1", "--box-threshold", "0", "--output", "none", "--events", str(tmp_path / "e.jsonl"),
            "--summary", str(tmp_path / "s.json"), "--quiet"]
    args = cli.parse_args(argv)
    cfg = PipelineConfig(imgsz=None, voting=VotingConfig.parse("1/1", clear=1))
    rt = build(cli.config_from_args(args), CPU, cfg)
    step, desc, imgsz = rt.step, rt.description, rt.imgsz
    assert desc["defense"] == "zmask" and desc["task"] == "detection" and tuple(imgsz) == HW
    results: List[StepResult] = []
    source = open_source(str(folder), SourceOptions())
    try:
        run_pipeline(source, step, lambda w, r: results.append(r), PipelineConfig(imgsz=imgsz), CPU)
    finally:
        source.close()
    assert len(results) == 3 and all(r.error is None and r.flagged and r.second_pass for r in results)
    assert all(r.masked is not None and r.masked.shape == HW for r in results)
    assert all(isinstance(r.boxes, Boxes) and r.label is None for r in results)
    assert results[1].propagated and results[1].alarm                     # voting and mask reuse still run
    code, summary = cli.run(cli.config_from_args(args))                                         # and the CLI end to end
    ev = frame_events(tmp_path / "e.jsonl")
    assert code == 0 and summary["second_passes"] == 3 and len(ev) == 3
    assert all(e["flagged"] and e["error"] is None and "mask_frac" in e for e in ev)
    check_box_events(ev)


def test_detectors_refuse_other_engines(tmp_path, capsys):
    folder = synthetic_frames(tmp_path / "in", 1)
    for extra in (["--engine", "onnxruntime"], ["--precision", "bf16"]):
        rc = cli.main(["--source", str(folder), "--model", "fcos_ddrnet", "--weights", "none", "--defense", "none",
                       "--output", str(tmp_path / "o.mp4"), "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "detectors run on --engine torch for now" in err[0], err
    assert not (tmp_path / "o.mp4").exists()
