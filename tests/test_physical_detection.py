"""The detector's physical-scene benchmark: targets outside the poster, its totals, and (with CamVid) a run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.physical_detection import PhysicalDetectionConfig, main, totals, visible_targets
from realtime.data import CLASSES


def _det(boxes, scores=None, labels=None):
    return {"boxes": boxes, "scores": scores if scores is not None else [0.9] * len(boxes),
            "labels": labels if labels is not None else [1] * len(boxes)}


def test_visible_targets_drop_what_the_poster_hides():
    lab = np.zeros((60, 80), np.int64)
    car = CLASSES.index("car")
    lab[10:30, 10:30] = car                     # a car the poster covers entirely
    lab[40:55, 50:75] = car                     # one it leaves visible
    gt = np.zeros(lab.shape, bool)
    gt[5:35, 5:35] = True
    t = visible_targets(lab, gt)
    assert t["boxes"] == [[50.0, 40.0, 75.0, 55.0]] and t["labels"] == [1]
    assert len(visible_targets(lab, np.zeros_like(gt))["boxes"]) == 2


def test_totals_score_damage_undone_and_fake_objects_on_the_poster():
    car, poster = [50.0, 40.0, 75.0, 55.0], [0.0, 0.0, 30.0, 30.0]
    frame = {"targets": {"boxes": [car], "labels": [1]}, "poster_box": poster, "flagged": True,
             "clean": _det([car]), "attacked": _det([poster]),            # the car is gone, a fake one appears
             "defended": _det([car]), "oracle": _det([car])}
    missed = dict(frame, flagged=False, defended=_det([poster]))
    cfg = PhysicalDetectionConfig()
    mask = {"inter": 5, "pred": 10, "true": 20, "frame_ious": [0.2]}
    t = totals([{"frames": [frame, json.loads(json.dumps(missed))], "mask": mask}], [[False, True, False, False]], cfg)
    assert t["patched_frames"] == 2 and t["flag_rate"] == 0.5 and t["clean_fpr"] == 0.25
    assert t["map"]["clean"]["map_50"] == pytest.approx(1.0) and t["map"]["attacked"]["map_50"] == pytest.approx(0.0)
    assert 0.0 < t["map50_damage_undone"] < 1.0 and t["map50_damage_undone_oracle"] == pytest.approx(1.0)
    assert t["false_on_poster"] == {"clean": 0, "attacked": 2, "defended": 1, "oracle": 0}
    assert t["mask"]["iou_pooled"] == pytest.approx(5 / 25)


def test_a_segmenter_is_refused_with_a_clear_error(capsys):
    assert main(["--model", "ddrnet23_slim", "--seeds", "1", "--quiet"]) != 0
    assert "not a detector" in capsys.readouterr().err


def test_physical_detection_end_to_end(tmp_path, camvid_root):
    out = tmp_path / "phys"
    args = ["--model", "fcos_ddrnet", "--patch", "apricot_L", "--seeds", "1", "--limit", "8", "--clean-splits", "val",
            "--data", str(camvid_root), "--out-dir", str(out), "--quiet"]
    assert main(args) == 0
    res = json.loads((out / "fcos_ddrnet_apricot_L_shipped.json").read_text())
    t = res["totals"]
    assert t["patched_frames"] == 4 and t["clean_frames"] == 8 and 0 <= t["flag_rate"] <= 1
    assert (out / "fcos_ddrnet_apricot_L_shipped.md").is_file()
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "fcos_ddrnet_apricot_L_shipped.json").read_text())["totals"] == t
