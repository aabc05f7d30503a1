"""The shipped detection artifacts work together on real CamVid val frames: trained detector + its Z-Mask
calibration + the library's EOT patch. The patch is flagged and masked, clean frames are not, and the
second pass runs on the shielded input."""
from pathlib import Path

import pytest
import torch

from realtime.defenses.artifact import CalibrationMismatchError, load_calibration
from realtime.attacks import Placement, apply_patch, load_patch_png
from realtime.data.detection import CamVidDetection
from realtime.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CAL = ROOT / "calibration" / "shipped" / "fcos_ddrnet.safetensors"
PATCH = ROOT / "realtime" / "attacks" / "library" / "fcos_ddrnet_eot_L.png"


def _frames(root: Path, indices):
    ds = CamVidDetection(root, "val")
    pairs = [ds[i] for i in indices]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def test_defended_detection_on_real_frames(camvid_root):
    model = build_model("fcos_ddrnet")
    zm = load_calibration(CAL, model).build_zmask(model).eval()
    patch, meta = load_patch_png(PATCH)
    assert meta["kind"] == "eot" and meta["task"] == "detection"
    x, _ = _frames(camvid_root, range(0, 100, 25))
    px, gt = apply_patch(x, patch, Placement("random"), None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, attacked = zm(x), zm(px)
    assert not clean.flagged.any(), clean.score
    assert (attacked.score > clean.score).all(), (attacked.score, clean.score)
    assert attacked.flagged.float().mean() >= 0.75
    masked = attacked.mask < 0.5
    hit = (masked & (gt > 0.5)).flatten(1).sum(1).float() / (gt > 0.5).flatten(1).sum(1)
    assert hit[attacked.flagged].mean() > 0.3                       # the mask lands on the patch
    spill = (masked & (gt < 0.5)).flatten(1).sum(1).float() / (gt < 0.5).flatten(1).sum(1)
    assert spill.max() < 0.2                                        # ... and not on the rest of the frame
    for i in range(len(x)):                                         # torchvision outputs, second pass on flagged only
        out, second = attacked.output[i], attacked.defended_output[i]
        assert set(second) == {"boxes", "scores", "labels"}
        if not attacked.flagged[i]:
            assert second is out


def test_detector_calibration_refuses_the_segmenter():
    with pytest.raises(CalibrationMismatchError, match="fcos_ddrnet"):
        load_calibration(CAL, build_model("ddrnet23_slim"))
