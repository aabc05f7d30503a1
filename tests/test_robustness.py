"""Robustness benchmark: metric functions on hand-made cases, conditions, resume, and a tiny real run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, jaccard_score

from realtime.core.metrics import ConfusionMatrix
from benchmarks.robustness import available_splits, main, validate_split
from benchmarks.robustness_conditions import library_conditions, load_condition, paste, resolve_conditions
from benchmarks.robustness_metrics import (detection_metrics, miou_from_confusion, per_frame_mask_counts,
                                           sum_counts, tpr_at_fpr)
from benchmarks.robustness_report import combine
from benchmarks.robustness_runner import Cell, load_cell, save_cell
from benchmarks.robustness_summary import summarize_cell
from realtime.attacks.apply import save_patch_png
from realtime.data import CLASSES, IGNORE_INDEX


def test_mask_precision_recall_iou_hand_made():
    keep = torch.ones(1, 1, 4, 4)
    keep[0, 0, :2, :2] = 0                    # masked: 4 pixels, top-left 2x2
    gt = torch.zeros(1, 1, 4, 4)
    gt[0, 0, :2, 1:4] = 1                     # patch: 6 pixels, top rows, columns 1-3
    rows = per_frame_mask_counts(keep, gt)
    assert rows.tolist() == [[2, 2, 4]]       # tp = (0,1),(1,1); fp = (0,0),(1,0); fn = 4
    s = sum_counts(rows, 16).summary()
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(2 / 6)
    assert s["iou"] == pytest.approx(2 / 8)
    assert s["masked_fraction"] == pytest.approx(4 / 16)


def test_mask_counts_gated_and_undefined_cases():
    rows = np.array([[10, 0, 0], [0, 5, 10], [0, 0, 0]])
    gated = sum_counts(rows, 100, np.array([True, False, False])).summary()
    assert (gated["iou"], gated["frames"]) == (1.0, 1)
    total = sum_counts(rows, 100).summary()
    assert total["iou"] == pytest.approx(10 / 25) and total["pixels"] == 300
    empty = sum_counts(rows[2:], 100).summary()
    assert empty["precision"] is None and empty["recall"] is None and empty["iou"] is None
    with pytest.raises(ValueError, match="do not match"):
        per_frame_mask_counts(torch.ones(1, 1, 4, 4), torch.ones(2, 1, 4, 4))


def test_tpr_at_one_percent_fpr_hand_made():
    neg = np.arange(100, dtype=float)          # 100 clean frames: 1 % FPR allows one of them
    pos = np.array([100.5, 99.2, 98.5, 10.0])
    assert tpr_at_fpr(neg, pos, 0.01) == pytest.approx(0.75)   # threshold 98.5 flags clean 99 only
    assert tpr_at_fpr(neg, pos, 0.0) == pytest.approx(0.5)
    d = detection_metrics([0.0, 1.0], [0.5, 2.0])
    assert d["auc"] == pytest.approx(0.75) and d["roc_fpr"][0] == 0 and d["roc_tpr"][-1] == 1
    with pytest.raises(ValueError, match="clean and patched"):
        tpr_at_fpr([], [1.0])


def test_miou_outside_patch_ignores_patch_pixels():
    y = torch.tensor([[0, 0, 1, 1], [0, 0, 1, IGNORE_INDEX]])
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])   # wrong only at (1,2) (and at void)
    patch = torch.zeros(2, 4, dtype=torch.bool)
    patch[1, 2] = True
    inside_cm, outside_cm = ConfusionMatrix(11, IGNORE_INDEX), ConfusionMatrix(11, IGNORE_INDEX)
    inside_cm.update(pred, y)
    outside_cm.update(pred, y, valid=~patch)
    assert miou_from_confusion(outside_cm.mat.tolist(), CLASSES, IGNORE_INDEX)["miou"] == pytest.approx(1.0)
    full = miou_from_confusion(inside_cm.mat.tolist(), CLASSES, IGNORE_INDEX)
    assert full["miou"] == pytest.approx((4 / 5 + 2 / 3) / 2) and full["pixels"] == 7


def test_confusion_matrix_agrees_with_sklearn_jaccard():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 12, (3, 20, 30), generator=g)          # 11 = void
    p = torch.randint(0, 11, (3, 20, 30), generator=g)
    valid = torch.rand(3, 20, 30, generator=g) > 0.2
    cm = ConfusionMatrix(11, IGNORE_INDEX)
    cm.update(p, y, valid=valid)
    keep = ((y != IGNORE_INDEX) & valid).numpy().ravel()
    yt, yp = y.numpy().ravel()[keep], p.numpy().ravel()[keep]
    assert (cm.mat.numpy() == confusion_matrix(yt, yp, labels=list(range(11)))).all()
    present = sorted(set(yt) | set(yp))
    ref = jaccard_score(yt, yp, labels=present, average=None).mean()
    assert miou_from_confusion(cm.mat.tolist(), CLASSES, IGNORE_INDEX)["miou"] == pytest.approx(ref)


def test_split_validation_lists_present_splits(tiny_camvid, capsys):
    assert available_splits(tiny_camvid) == ["train", "val"]
    with pytest.raises(ValueError, match="present: train, val"):
        validate_split(tiny_camvid, "test")
    rc = main(["--model", "ddrnet23_slim", "--data", str(tiny_camvid), "--split", "test", "--quiet"])
    assert rc == 2 and "split 'test' not found" in capsys.readouterr().err


def test_conditions_discovery_order_and_errors(tmp_path):
    for name in ("eot_L", "beta0.5_L", "advmask_a0.3_L", "random_L", "beta0.1_L", "notes_L"):
        save_patch_png(torch.rand(3, 4, 5), tmp_path / f"m_{name}.png", {"fingerprint": "abc"})
    assert library_conditions("m", tmp_path) == ["none", "random_L", "eot_L", "beta0.1_L", "beta0.5_L",
                                                 "advmask_a0.3_L"]
    conds = resolve_conditions("m", ["eot_L", "advmask_a0.3_L"], "abc", tmp_path)
    assert [c.name for c in conds] == ["none", "eot_L", "advmask_a0.3_L"]
    assert (conds[2].kind, conds[2].alpha) == ("adv-mask", 0.3)
    assert load_condition("m", "beta0.5_L", tmp_path).beta == 0.5
    with pytest.raises(FileNotFoundError, match="available for m: none, random_L"):
        load_condition("m", "eot_S", tmp_path)
    with pytest.raises(KeyError, match="unknown condition"):
        load_condition("m", "bogus", tmp_path)


def test_placement_is_per_frame_not_per_batch():
    x = torch.rand(3, 3, 40, 60)
    patch = torch.rand(3, 8, 10)
    _, whole = paste(x, patch, [0, 1, 2], seed=5)
    _, single = paste(x[2:], patch, [2], seed=5)
    assert torch.equal(whole[2:], single)
    assert not torch.equal(whole[0], whole[1])                  # frames get their own places
    assert whole.flatten(1).sum(1).tolist() == [80.0] * 3
    _, none = paste(x, None, [0, 1, 2], seed=5)
    assert none.sum() == 0


def _cell(cond: str, scores, flagged, counts, sig=None) -> Cell:
    cm = np.zeros((11, 11), dtype=int)
    cm[0, 0] = 10
    return Cell("d", cond, sig or {"k": 1}, cm.tolist(), [1.0] * len(scores), 100, scores, flagged, counts)


def test_summary_uses_clean_scores_as_negatives_and_gates_masks():
    clean = _cell("none", [0.1, 0.2, 0.3], [False, False, False], [[0, 0, 0]] * 3)
    hit = _cell("eot_L", [0.25, 0.9, 0.8], [False, True, True], [[0, 0, 20], [10, 0, 10], [20, 0, 0]])
    s = summarize_cell(hit, clean)
    assert s["detection"]["auc"] == pytest.approx(8 / 9)   # 0.25 beats 0.1, 0.2; 0.9, 0.8 beat all
    assert s["flag_rate"] == pytest.approx(2 / 3)
    assert s["mask"]["recall"] == pytest.approx(30 / 60) and s["mask_gated"]["recall"] == pytest.approx(30 / 40)
    assert "detection" not in summarize_cell(clean, clean)


def test_resume_reuses_only_matching_cells(tmp_path):
    c = _cell("none", [0.1], [False], [[0, 0, 0]], sig={"frames": 2})
    save_cell(c, tmp_path)
    assert load_cell(tmp_path, "d", "none", {"frames": 2}).scores == [0.1]
    assert load_cell(tmp_path, "d", "none", {"frames": 3}) is None
    assert load_cell(tmp_path, "d", "eot_L", {"frames": 2}) is None


def test_end_to_end_tiny_run(tmp_path):
    from realtime.data import CamVid, DataNotFoundError
    try:
        CamVid(None, "val")
    except DataNotFoundError as exc:
        pytest.skip(f"CamVid data not found: {exc}")
    root = Path(__file__).resolve().parents[1]
    for need in (root / "realtime/models/weights/ddrnet23_slim_camvid.pt",
                 root / "calibration/shipped/ddrnet23_slim.safetensors"):
        if not need.is_file():
            pytest.skip(f"{need} not available")
    args = ["--model", "ddrnet23_slim", "--split", "val", "--limit", "2", "--defenses", "none,zmask",
            "--conditions", "none,eot_L", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet"]
    assert main(args) == 0
    res = json.loads((tmp_path / "robustness_ddrnet23_slim_val.json").read_text())
    assert res["settings"]["frames"] == 2 and list(res["results"]) == ["none", "zmask"]
    z = res["results"]["zmask"]["conditions"]
    assert 0 <= z["eot_L"]["miou"] <= 1 and 0 <= z["eot_L"]["detection"]["auc"] <= 1
    assert z["none"]["pixels_scored"] == res["results"]["none"]["conditions"]["none"]["pixels_scored"]
    assert "mask" in z["eot_L"] and "mask" not in res["results"]["none"]["conditions"]["eot_L"]
    assert (tmp_path / "robustness_ddrnet23_slim_val.md").read_text().count("| `zmask` |") >= 2
    assert (tmp_path / "robustness_ddrnet23_slim_val_roc_eot_L.png").stat().st_size > 1000
    cell = tmp_path / "partial" / "ddrnet23_slim_val" / "zmask__eot_L.json"
    before = cell.stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert cell.stat().st_mtime_ns == before                    # reused, not recomputed
    text = combine(tmp_path, "val")
    assert "## Z-Mask vs LGS on L" in text and "lgs missing" in text


def _fake_results() -> dict:
    """A hand-made results dict: two defenses, clean / eot_L / two defense-aware conditions."""
    det = {"auc": 0.9, "tpr_at_fpr": 0.5, "roc_fpr": [0, 0, 1], "roc_tpr": [0, 0.5, 1]}
    cell = lambda miou, d=None: {"miou": miou, "detection": d, "flag_rate": 0.5,  # noqa: E731
                                 "mask": {"iou": 0.4, "precision": 0.5, "recall": 0.6}, "mask_gated": {"iou": 0.7}}
    conds = {"none": {"kind": "clean"}, "eot_L": {"kind": "eot"},
             "advmask_a0.2_L": {"kind": "adv-mask", "alpha": 0.2}, "advmask_a0.8_L": {"kind": "adv-mask", "alpha": 0.8},
             "advflag_a0.5_L": {"kind": "adv-flag", "alpha": 0.5}}
    zm = {c: cell(0.6, None if c == "none" else det) for c in conds}
    return {"settings": {"model": "m", "split": "val", "frames": 4, "seed": 0, "capture": "none", "batch": 1,
                         "fingerprint": "f"}, "env": {"device": "cpu", "threads": "2"}, "conditions": conds,
            "results": {"none": {"conditions": {c: {"miou": 0.5} for c in conds}, "latency_ms": {"median": 3.0}},
                        "zmask": {"conditions": zm, "flags": True, "masks": True, "latency_ms": {"median": 5.0}}}}


def test_report_tables_and_alpha_plot(tmp_path):
    from benchmarks.robustness_report import model_markdown, write_outputs
    res = _fake_results()
    md = model_markdown(res)
    assert "| `zmask` | 0.500 | 0.900 / 0.500 / 0.500 |" in md    # detection table: clean flag rate, eot_L
    assert "0.400 / 0.700 (P 0.50, R 0.60)" in md and "advflag_a0.5_L" in md
    files = {p.name for p in write_outputs(res, tmp_path)}
    assert files == {"robustness_m_val.md", "robustness_m_val_roc_eot_L.png", "robustness_m_val_alpha.png"}


def test_isolated_hooks_removes_only_hooks_added_inside():
    from benchmarks.robustness import isolated_hooks
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    kept = net[0].register_forward_hook(lambda *a: None)
    with isolated_hooks(net):
        net[0].register_forward_hook(lambda *a: None)
        net[1].register_forward_pre_hook(lambda *a: None)
        net.train()
    assert list(net[0]._forward_hooks) == [kept.id] and not net[1]._forward_pre_hooks
    assert not net.training
