"""PatchZero: the detector network, the defense, the training command and the shipped weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from realtime.defenses.patchzero import (DEFAULT_WEIGHTS, PatchDetector, PatchZero, PatchZeroConfig, dilate_mask,
                                         load_detector, pixel_counts, prf)
from calibration.patchzero_train import (TEST_PATCH_GLOB, TRAIN_PATCH_GLOB, TrainConfig, library_patches,
                                               lr_at, main, make_batch)
from realtime.defenses.registry import REPO, DefenseContext, build_defense
from realtime.models import build_model


def test_detector_size_and_any_input_shape() -> None:
    net = PatchDetector().eval()
    assert 300_000 <= sum(p.numel() for p in net.parameters()) <= 1_000_000
    with torch.no_grad():
        for hw in [(37, 53), (180, 240), (64, 96)]:
            assert net(torch.rand(2, 3, *hw)).shape == (2, 1, *hw)


def test_dilate_and_metrics() -> None:
    m = torch.zeros(1, 1, 9, 9)
    m[0, 0, 4, 4] = 1
    assert int(dilate_mask(m, 2).sum()) == 25 and torch.equal(dilate_mask(m, 0), m)
    pred, gt = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])
    assert pixel_counts(pred, gt) == [1, 1, 1]
    assert prf(1, 1, 1) == {"precision": 0.5, "recall": 0.5, "f1": 0.5} and prf(0, 0, 0)["f1"] == 0.0


def test_config_and_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PatchZeroConfig(threshold=1.5)
    with pytest.raises(ValueError):
        PatchZeroConfig(work_size=(8, 8))
    with pytest.raises(FileNotFoundError, match="patchzero_train"):
        load_detector(tmp_path / "missing.pt")


def test_train_and_test_patches_are_disjoint() -> None:
    train, test = set(library_patches(TRAIN_PATCH_GLOB)), set(library_patches(TEST_PATCH_GLOB))
    assert train and test and not train & test
    assert not any("eot" in name for name in train) and all("eot" in name for name in test)


def test_make_batch_half_clean_with_exact_masks() -> None:
    cfg = TrainConfig(work_size=(60, 80))
    frames = torch.randint(0, 255, (6, 3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lib = list(library_patches(TRAIN_PATCH_GLOB).values())
    x, y = make_batch(frames, torch.arange(6), cfg, lib, torch.Generator().manual_seed(1))
    assert x.shape == (6, 3, 60, 80) and y.shape == (6, 1, 60, 80)
    assert float(y[:3].sum()) == 0 and all(float(y[i].sum()) > 0 for i in range(3, 6))
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_lr_schedule_warms_up_and_anneals() -> None:
    assert lr_at(1.0, 0.0) < lr_at(1.0, 0.03) == pytest.approx(1.0)
    assert lr_at(1.0, 1.0) == pytest.approx(0.01) and lr_at(1.0, 0.5) > lr_at(1.0, 0.9)


def test_training_command_end_to_end(tiny_camvid: Path, tmp_path: Path) -> None:
    out = tmp_path / "pz.pt"
    args = ["--data", str(tiny_camvid), "--out", str(out), "--ckpt", str(tmp_path / "ck.pt"), "--epochs", "1",
            "--batch", "2", "--report", str(tmp_path / "pz.md")]
    assert main(args) == 0
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["epochs_done"] == 1 and {"clean", "all"} <= set(meta["val"])
    assert "| clean |" in (tmp_path / "pz.md").read_text()
    assert main(args + ["--epochs", "2", "--resume"]) == 0              # continues from the checkpoint
    assert json.loads(out.with_suffix(".json").read_text())["epochs_done"] == 2
    net, _ = load_detector(out)
    d = build_defense("patchzero", DefenseContext(build_model("ddrnet23_slim"), "ddrnet23_slim"), weights=str(out))
    assert isinstance(d, PatchZero) and isinstance(net, PatchDetector)


def _shipped() -> None:
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"{DEFAULT_WEIGHTS} not trained (python -m calibration.patchzero_train)")


def test_shipped_weights_sidecar() -> None:
    _shipped()
    meta = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert meta["train_frames"] > 0 and "eot" not in " ".join(meta["train_patches"])
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= meta["val"]["all"][key] <= 1.0
    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000


def test_shipped_detector_finds_eot_patch_on_val_frame(camvid_root: Path) -> None:
    _shipped()
    from realtime.attacks.apply import Placement, apply_patch, load_patch_png
    from realtime.data import CamVid
    img, _ = CamVid(camvid_root, "val").to_tensors([5])
    x = img.float().div(255)
    model = build_model("ddrnet23_slim")
    d = build_defense("patchzero", DefenseContext(model, "ddrnet23_slim"))
    patch, _ = load_patch_png(REPO / "realtime" / "attacks" / "library" / "ddrnet23_slim_eot_L.png")
    xp, gt = apply_patch(x, patch, Placement("fixed", top_left=(140, 200)))
    with torch.no_grad():
        r = d(torch.cat([x, xp]))
    removed = 1 - r.mask
    assert float((removed[1:] * gt).sum() / gt.sum()) > 0.7          # most of the held-out patch found
    assert float(removed[0].mean()) < 0.02                             # the clean frame mostly untouched
    assert r.flagged.tolist() == [False, True] and float(r.score[1]) > float(r.score[0])
    fill = model.mean_color.view(3)
    hole = r.mask[1, 0] == 0
    assert torch.allclose(r.defended_input[1][:, hole], fill.view(3, 1).expand(3, int(hole.sum())), atol=1e-6)
