import pytest
import torch

from calibration import fit as fit_mod
from realtime.defenses.artifact import Calibration, CalibrationMismatchError, load_calibration
from realtime.defenses import ChannelStats, FusionBlock, SPRConfig, ZMaskConfig
from realtime.models import build_model, fingerprint


def _toy_calibration(model) -> Calibration:
    spr = SPRConfig.for_input(96, 128)
    stats = ChannelStats({"layer1": torch.rand(32), "layer5": torch.rand(512)},
                         {"layer1": torch.rand(32) + 0.5, "layer5": torch.rand(512) + 0.5})
    cfg = ZMaskConfig(shallow=("layer1",), deep=("layer5",), spr=spr, lambda0=0.25)
    return Calibration(model_name="ddrnet23_slim", fingerprint=fingerprint(model), input_size=(96, 128), config=cfg,
                       stats=stats, fusion=FusionBlock(w1=2.0).to_dict(),
                       roc={"auc": 0.9, "fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "thresholds": [1e30, 0.0]},
                       extra={"note": "toy"})


def test_artifact_round_trip_and_model_check(tmp_path):
    torch.manual_seed(0)
    model = build_model("ddrnet23_slim", weights=None)
    cal = _toy_calibration(model)
    path = cal.save(tmp_path / "c.safetensors")
    back = load_calibration(path, model)
    assert back.config == cal.config and back.fusion == cal.fusion and back.roc["fpr"] == [0.0, 1.0]
    assert torch.equal(back.stats.mu["layer5"], cal.stats.mu["layer5"])
    zm = back.build_zmask(model)
    r = zm.analyse(torch.rand(1, 3, 96, 128))
    assert r.score.shape == (1,) and float(zm.fusion.w1) == 2.0
    other = build_model("ddrnet23_slim", weights=None)          # same architecture, other weights
    with pytest.raises(CalibrationMismatchError, match="fingerprint"):
        load_calibration(path, other)
    with pytest.raises(CalibrationMismatchError):
        back.build_zmask(other)


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable"):
        load_calibration(bad)
    with pytest.raises(FileNotFoundError):
        load_calibration(tmp_path / "missing.safetensors")


def test_fit_end_to_end_small(camvid_root, tmp_path):
    args = fit_mod.parse_args(["--model", "ddrnet23_slim", "--stats-frames", "6", "--fit-frames", "6",
                               "--fusion-steps", "10", "--patches", "", "--device", "cpu",
                               "--out", str(tmp_path / "cal.safetensors"), "--report-dir", str(tmp_path / "rep")])
    summary = fit_mod.fit(args)
    cal = load_calibration(tmp_path / "cal.safetensors", build_model("ddrnet23_slim"))
    assert len(cal.config.shallow) == 3 and len(cal.config.deep) == 2
    assert cal.config.lambda0 == pytest.approx(summary["lambda0"])
    assert set(cal.stats.mu) == set(cal.config.shallow) | set(cal.config.deep)
    assert len(cal.extra["ranking"]) == len(build_model("ddrnet23_slim", weights=None).layers().candidates)
    for f in ("roc_fit.png", "heatmaps_fit.png", "layer_ranking.md", "fit.json"):
        assert (tmp_path / "rep" / f).is_file()


def test_artifact_write_is_whole_and_follows_the_umask(tmp_path):
    """The saved calibration gets the umask's permissions (safetensors' save_file gives 0600) and no temp
    file is left behind; an interrupted write (here: an unwritable tensor) keeps the old artifact."""
    import os
    torch.manual_seed(0)
    model = build_model("ddrnet23_slim", weights=None)
    cal = _toy_calibration(model)
    old = os.umask(0o022)
    try:
        path = cal.save(tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    before = path.read_bytes()
    from realtime.core.files import write_safetensors
    with pytest.raises(Exception):
        write_safetensors(path, {"bad": "not a tensor"}, {})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
