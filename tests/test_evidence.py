"""benchmarks.evidence: the evidence ratio is fitted on clean training sequences only and replayed over recorded
adaptive-frontier scores; runs measured with other defense settings are refused."""
import json

import pytest

from benchmarks.evidence import EvidenceConfig, analyse, main, markdown

LAM = 0.1
DESC = {"defense": "zmask", "lambda0": LAM, "shallow": ["a"], "heatmaps": "reference"}


def _write(tmp_path, desc_adaptive=DESC):
    phys = tmp_path / "physical" / "run.json"
    parts = phys.parent / "parts" / "run"
    parts.mkdir(parents=True)
    clean = {("train", "A"): [0.05, 0.07, 0.06, 0.08, 0.05, 0.06], ("val", "B"): [0.04, 0.05, 0.09, 0.06, 0.04]}
    for (split, seq), scores in clean.items():
        (parts / f"clean_{split}_{seq}.json").write_text(json.dumps({"key": "k", "value": {"scores": scores}}))
    phys.write_text(json.dumps({"clean": [{"split": s, "sequence": q} for s, q in clean],
                                "zmask": {**DESC, "heatmaps": "cpu kernel"}}))
    ada = tmp_path / "adaptive" / "adaptive_m.json"
    cells = ada.parent / "m" / "cells"
    cells.mkdir(parents=True)
    patched = {"under": [0.09] * 10, "dark": [0.04] * 10}
    points = {}
    for name, scores in patched.items():
        (cells / f"zmask__{name}.json").write_text(json.dumps(
            {"signature": {"defense": desc_adaptive}, "scores": scores, "flagged": [s > LAM for s in scores]}))
        points[name] = {"damage_kept_defended": 0.8, "damage_undone": 0.0, "why": "evades with damage"}
    ada.write_text(json.dumps({"settings": {"defense": "zmask", "tag": "m"}, "points": points, "also_measured": {}}))
    return phys, ada


def test_fit_on_train_and_replay(tmp_path):
    phys, ada = _write(tmp_path)
    res = analyse(EvidenceConfig(model="m", physical=str(phys), adaptive=str(ada), windows=(2, 4)))
    w2, w4 = res["windows"]
    assert w2["ratio"] == pytest.approx(0.7, rel=1e-6)          # train's largest 2-frame mean: (0.06 + 0.08) / 2 / 0.1
    assert w4["ratio"] == pytest.approx(0.65, rel=1e-6)
    val = next(c for c in w2["clean"] if c["split"] == "val")
    assert val["evidence_alarm_frames"] == 1                       # held-out val: one 2-frame mean (0.75) exceeds it
    assert next(c for c in w4["clean"] if c["split"] == "val")["evidence_alarm_frames"] == 0
    assert w4["patches"]["under"]["evidence_coverage"] == 1.0 and w4["patches"]["under"]["flag_rate"] == 0.0
    assert w4["patches"]["dark"]["evidence_coverage"] == 0.0
    assert "| under |" in markdown(res)


def test_other_defense_settings_are_refused(tmp_path, capsys):
    phys, ada = _write(tmp_path, {**DESC, "lambda0": 0.2})
    with pytest.raises(ValueError, match="not comparable"):
        analyse(EvidenceConfig(model="m", physical=str(phys), adaptive=str(ada)))
    assert main(["--model", "m", "--physical", str(phys), "--adaptive", str(ada), "--out-dir", str(tmp_path)]) == 2
    assert "not comparable" in capsys.readouterr().err
