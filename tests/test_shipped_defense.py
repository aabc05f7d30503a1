"""The shipped artifacts work together: calibration + library patch + trained model, on real val frames."""
from pathlib import Path

import pytest
import torch

from realtime.defenses.artifact import load_calibration
from realtime.attacks import Placement, apply_patch, load_patch_png
from realtime.data import CamVid
from realtime.models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["ddrnet23_slim", "bisenetv1"])
def test_crafted_patch_scores_higher_than_its_clean_twin(camvid_root, name):
    model = build_model(name)
    zm = load_calibration(ROOT / "calibration" / "shipped" / f"{name}.safetensors", model).build_zmask(model).eval()
    patch, meta = load_patch_png(ROOT / "realtime" / "attacks" / "library" / f"{name}_eot_L.png")
    images, _ = CamVid(camvid_root, "val").to_tensors(range(0, 100, 25))
    x = images.float() / 255
    px, gt = apply_patch(x, patch, Placement("random"), None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, attacked = zm(x), zm(px)
    assert (attacked.score > clean.score).all(), (attacked.score, clean.score)
    assert attacked.flagged.float().mean() >= 0.75
    masked = attacked.mask < 0.5
    hit = (masked & (gt > 0.5)).flatten(1).sum(1).float() / (gt > 0.5).flatten(1).sum(1)
    assert hit[attacked.flagged].mean() > 0.3          # the mask lands on the patch
    # a second pass ran on flagged frames only, on the shielded input
    assert torch.equal(attacked.defended_output[~attacked.flagged], attacked.output[~attacked.flagged])


def test_shipped_calibration_refuses_the_other_model():
    from realtime.defenses.artifact import CalibrationMismatchError
    with pytest.raises(CalibrationMismatchError, match="ddrnet23_slim"):
        load_calibration(ROOT / "calibration" / "shipped" / "ddrnet23_slim.safetensors", build_model("bisenetv1"))
