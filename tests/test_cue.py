"""The outlier cue next to Z-Mask (realtime.defenses.cue) and its clean-only fit (calibration.cue)."""
import json

import pytest
import torch

from realtime.defenses.artifact import load_calibration
from realtime.defenses.cue import CuedZMask, OutlierCue, load_cue
from realtime.defenses.registry import REPO, DefenseContext, build_defense
from realtime.models import build_model, fingerprint

CAL = REPO / "calibration" / "shipped" / "ddrnet23_slim.safetensors"
LAYERS = ("conv1", "layer1")


@pytest.fixture(scope="module")
def model():
    return build_model("ddrnet23_slim").eval()


def _cue(model, frame=1.0, cell=1.0, channels=(32, 32)):
    mu = {n: torch.zeros(c) for n, c in zip(LAYERS, channels)}
    sigma = {n: torch.ones(c) for n, c in zip(LAYERS, channels)}
    return OutlierCue("ddrnet23_slim", fingerprint(model), LAYERS, mu, sigma, {n: frame for n in LAYERS},
                      {n: cell for n in LAYERS})


def test_cue_score_and_hits_follow_the_maps():
    cue = OutlierCue("m", "f", ("a",), {"a": torch.zeros(2)}, {"a": torch.ones(2)}, {"a": 2.0}, {"a": 1.0}, pool=1)
    feat = torch.zeros(2, 2, 4, 4)
    feat[1, :, 1, 2] = 6.0                              # one outlying cell in frame 1 (mean |z| 6)
    from realtime.defenses import SPRConfig
    maps = cue.maps({"a": feat}, SPRConfig((4, 4), ((1, 1),), ((1, 1),)))
    score = cue.score(maps)
    assert score[0] == 0 and score[1] == pytest.approx(3.0, rel=1e-4)   # zscore eps
    hit = cue.hit(maps)
    assert hit[1, 0, 1, 2] and int(hit.sum()) == 1


def test_cue_artifact_roundtrip_and_refusals(tmp_path, model):
    cue = _cue(model, 2.5, 1.5)
    path = cue.save(tmp_path / "cue.safetensors")
    back = load_cue(path, model)
    assert back.layers == LAYERS and back.frame_threshold == cue.frame_threshold
    torch.testing.assert_close(back.sigma["layer1"], cue.sigma["layer1"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable outlier-cue"):
        load_cue(tmp_path / "junk.safetensors")
    other = OutlierCue("x", "0000", LAYERS, cue.mu, cue.sigma, cue.frame_threshold, cue.cell_threshold)
    with pytest.raises(ValueError, match="fitted for model"):
        load_cue(other.save(tmp_path / "other.safetensors"), model)
    bad = OutlierCue("x", "0", LAYERS, cue.mu, cue.sigma, {n: 0.0 for n in LAYERS}, cue.cell_threshold)
    with pytest.raises(ValueError, match="non-positive"):
        load_cue(bad.save(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="calibration.cue"):
        load_cue(tmp_path / "missing.safetensors")


def test_cued_zmask_combines_score_flag_and_mask(model):
    cal = load_calibration(CAL, model)
    x = torch.rand(2, 3, 120, 160, generator=torch.Generator().manual_seed(0))
    plain = cal.build_zmask(model)
    with torch.no_grad():
        ref = plain.analyse(x)
    plain.taps.remove()
    # thresholds so low that the cue flags every frame and masks some cells
    zm = CuedZMask.build(cal, model, _cue(model, frame=1e-3, cell=0.5))
    with torch.no_grad():
        res = zm.analyse(x)
    lam = cal.config.lambda0
    assert bool(res.flagged.all())
    assert torch.all(res.score >= ref.score - 1e-6) and torch.all(res.score > lam)
    assert torch.equal(res.flagged, res.score > lam)
    assert float((res.mask < 0.5).float().mean()) >= float((ref.mask < 0.5).float().mean())
    zm.taps.remove()
    # thresholds so high that the cue never fires: exactly plain Z-Mask
    zm = CuedZMask.build(cal, model, _cue(model, frame=1e9, cell=1e9))
    with torch.no_grad():
        res = zm.analyse(x)
    torch.testing.assert_close(res.score, ref.score)
    assert torch.equal(res.flagged, ref.flagged) and torch.equal(res.mask, ref.mask)
    zm.taps.remove()


def test_fit_cli_writes_a_loadable_cue_and_the_defense_uses_it(tmp_path, model, synthetic_camvid):
    from calibration.cue import main
    data = synthetic_camvid(tmp_path / "data", train=6)
    out = tmp_path / "cue.safetensors"
    assert main(["--model", "ddrnet23_slim", "--data", str(data), "--out", str(out),
                 "--report-dir", str(tmp_path / "rep"), "--quiet"]) == 0
    cue = load_cue(out, model)
    assert cue.layers == LAYERS and all(v > 0 for v in cue.frame_threshold.values())
    rep = json.loads((tmp_path / "rep" / "cue.json").read_text())
    assert rep["held_out_frames"] == 3 and 0.0 <= rep["held_out_fpr"] <= 1.0 and "val_fpr" in rep
    d = build_defense("zmask_cue", DefenseContext(model, "ddrnet23_slim", calibration=CAL), cue=str(out))
    assert d.name == "zmask_cue" and d.describe()["cue_layers"] == list(LAYERS)
    with torch.no_grad():
        r = d(torch.rand(1, 3, 120, 160))
    assert r.flagged is not None and r.score is not None
    assert main(["--model", "ddrnet23_slim", "--data", str(data), "--quantile", "2"]) == 2


def test_whitebox_attacker_reads_the_cue(model):
    """The white-box z term covers the cue's layers, and its score hinge sees max(d, cue * lambda0)."""
    from realtime.attacks.whitebox import DefendedForward, zscore_under_patch
    cal = load_calibration(CAL, model)
    x = torch.rand(1, 3, 120, 160, generator=torch.Generator().manual_seed(1))
    patch_mask = torch.zeros(1, 1, 120, 160)
    patch_mask[..., 30:70, 40:90] = 1
    plain = cal.build_zmask(model)
    fwd = DefendedForward(plain)
    with torch.no_grad():
        fwd(x)
    z_plain = zscore_under_patch(fwd.last["taps"], patch_mask, plain)
    plain.taps.remove()
    cued = CuedZMask.build(cal, model, _cue(model, frame=1e-3, cell=1e9))
    fwd = DefendedForward(cued)
    with torch.no_grad():
        fwd(x)
    assert set(LAYERS) <= set(fwd.last["taps"])
    z_cued = zscore_under_patch(fwd.last["taps"], patch_mask, cued)
    assert not torch.allclose(z_plain, z_cued)                   # two more layers in the mean
    assert float(fwd.last["score"]) > cal.config.lambda0        # the cue's share of the score
    cued.taps.remove()
