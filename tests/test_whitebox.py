"""White-box attacker against Z-Mask (realtime.attacks.whitebox) and the adaptive frontier benchmark."""
import json

import numpy as np
import pytest
import torch

from realtime.attacks import CaptureConfig, EOTConfig, Placement, apply_patch, craft_universal_patch
from realtime.attacks.apply import save_patch_png
from realtime.attacks.whitebox import DefendedForward, EvasionLoss, WhiteBoxConfig
from realtime.core.taps import ActivationTaps
from realtime.defenses import SPRConfig, ZMask, ZMaskConfig, fit_channel_stats
from realtime.models import build_model

LAYERS = ("layer1", "layer3_")
PLACE = Placement("fixed", top_left=(30, 40))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("ddrnet23_slim").eval()
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(4, 3, 120, 160, generator=g) * 255).round().to(torch.uint8)
    labs = torch.randint(0, 11, (4, 120, 160), generator=g).to(torch.uint8)
    spr = SPRConfig.for_input(120, 160)
    taps = ActivationTaps(model, LAYERS)
    with torch.no_grad():
        _, maps = taps(imgs.float() / 255)
    taps.remove()
    stats = fit_channel_stats([maps], spr)
    return model, imgs, labs, spr, stats


def _zmask(model, spr, stats, lambda0, mask_threshold=0.5):
    return ZMask(model, ZMaskConfig(shallow=LAYERS, deep=LAYERS, spr=spr, lambda0=lambda0,
                                    mask_threshold=mask_threshold), stats)


def test_defended_forward_matches_the_defense_and_masks_gradients(setup):
    model, imgs, _, spr, stats = setup
    patch = torch.rand(3, 40, 54, generator=torch.Generator().manual_seed(1))
    x, _ = apply_patch(imgs.float() / 255, patch, PLACE)
    probe = _zmask(model, spr, stats, 0.0)
    with torch.no_grad():
        first = probe.analyse(x)
    probe.taps.remove()
    lam = float(first.score.median())                   # some frames flagged, some not
    thr = float(first.soft_mask.flatten().quantile(0.9))     # and part of each flagged frame masked
    zm = _zmask(model, spr, stats, lam, thr)
    with torch.no_grad():
        ref = zm(x)
        got = DefendedForward(zm)(x)
    assert 0 < int(ref.flagged.sum()) < len(x)
    torch.testing.assert_close(got, ref.defended_output, rtol=1e-4, atol=1e-4)
    xg = x.clone().requires_grad_(True)
    fwd = DefendedForward(zm)
    fwd(xg).sum().backward()
    i = int(torch.nonzero(ref.flagged)[0])
    masked = ref.mask[i, 0] < 0.5
    assert bool(masked.any())
    assert float(xg.grad[i][:, masked].abs().max()) == 0.0        # BPDA: masked pixels carry no gradient
    assert float(xg.grad[i][:, ~masked].abs().sum()) > 0.0
    assert set(fwd.last) == {"taps", "soft", "score", "flagged"}
    zm.taps.remove()


def test_evasion_loss_is_minimised_by_crafting(setup):
    model, imgs, labs, spr, stats = setup
    zm = _zmask(model, spr, stats, 1.0)
    fwd = DefendedForward(zm)
    loss = EvasionLoss(fwd, WhiteBoxConfig())
    x = imgs[:2].float() / 255
    start = torch.rand(3, 40, 54, generator=torch.Generator().manual_seed(2))

    def value(p):
        with torch.no_grad():
            px, m = apply_patch(x, p, PLACE)
            fwd(px)
            return {k: float(v) for k, v in loss.parts(m).items()}

    before = value(start)
    cfg = EOTConfig(hw=(40, 54), steps=8, batch_size=2, lr=0.05, beta=0.0, tv_weight=0.0,
                    capture=CaptureConfig.none(), placement=PLACE, seed=2)
    crafted, hist = craft_universal_patch(fwd, imgs[:2], labs[:2], cfg, "cpu", progress=False,
                                          extra_loss=loss, init=start)
    after = value(crafted)
    assert after["z"] < before["z"]
    assert all(np.isfinite(h["extra"]) for h in hist)
    zm.taps.remove()


def test_whitebox_config_rejects_bad_values():
    with pytest.raises(ValueError, match=">= 0"):
        WhiteBoxConfig(z_weight=-1)
    with pytest.raises(ValueError, match="margin"):
        WhiteBoxConfig(margin=2.0)


def _cell(defense, condition, miou_hit, flagged=None, scores=None, masks=None):
    """A synthetic robustness cell whose mIoU is ``miou_hit`` (2 classes confused at that rate)."""
    from benchmarks.robustness_runner import Cell
    from realtime.data import CLASSES
    n = len(CLASSES)
    cm = np.zeros((n, n), dtype=np.int64)
    for c in range(n):
        cm[c, c] = int(round(1000 * miou_hit))
        cm[c, (c + 1) % n] = 1000 - cm[c, c]
    frames = len(flagged) if flagged is not None else 4
    return Cell(defense, condition, {}, cm.tolist(), [1.0] * frames, 100, scores=scores, flagged=flagged,
                mask_counts=masks)


def test_frontier_pass_rule():
    from benchmarks.adaptive_report import summarize_point
    clean_scores = [0.0, 0.1, 0.2, 0.1]
    cells = {("none", "none"): _cell("none", "none", 0.9), ("zmask", "none"): _cell("zmask", "none", 0.9, [False] * 4, clean_scores, [[0, 0, 0]] * 4),
             ("none", "eot_L"): _cell("none", "eot_L", 0.5)}
    # caught: flagged everywhere, most damage undone
    cells[("none", "a")] = _cell("none", "a", 0.5)
    cells[("zmask", "a")] = _cell("zmask", "a", 0.85, [True] * 4, [5.0] * 4, [[10, 0, 0]] * 4)
    # evades: never flagged, keeps its damage
    cells[("none", "b")] = _cell("none", "b", 0.6)
    cells[("zmask", "b")] = _cell("zmask", "b", 0.6, [False] * 4, [0.1] * 4, [[0, 0, 10]] * 4)
    # harmless: never flagged, little damage
    cells[("none", "c")] = _cell("none", "c", 0.85)
    cells[("zmask", "c")] = _cell("zmask", "c", 0.85, [False] * 4, [0.1] * 4, [[0, 0, 10]] * 4)
    a, b, c = (summarize_point(cells, k) for k in "abc")
    assert a["passes"] and a["why"] == "flagged and undone" and a["auc"] == 1.0
    assert not b["passes"] and b["why"] == "evades with damage"
    assert c["passes"] and c["why"] == "harmless"
    assert b["damage_kept_undefended"] == b["damage_kept_defended"] > 0.3


def test_adaptive_benchmark_end_to_end(tmp_path, capsys, synthetic_camvid):
    from benchmarks.adaptive import main
    data, lib, out = synthetic_camvid(tmp_path / "data", train=3), tmp_path / "lib", tmp_path / "out"
    save_patch_png(torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0)), lib / "ddrnet23_slim_eot_L.png",
                   {"kind": "eot"})
    args = ["--model", "ddrnet23_slim", "--data", str(data), "--library", str(lib), "--out-dir", str(out),
            "--betas", "0.5", "--attackers", "full,zscore", "--steps", "1", "--batch-size", "1", "--quiet"]
    assert main(args) == 0
    res = json.loads((out / "adaptive_ddrnet23_slim.json").read_text())
    assert set(res["points"]) == {"eot_L", "full_b0.5", "zscore_b0.5"}
    assert (out / "adaptive_ddrnet23_slim.png").is_file()
    assert "| full_b0.5 |" in (out / "adaptive_ddrnet23_slim.md").read_text()
    cells = sorted(p.name for p in (out / "ddrnet23_slim" / "cells").iterdir())
    assert "zmask__full_b0.5.json" in cells
    before = {p: p.stat().st_mtime_ns for p in (out / "ddrnet23_slim" / "cells").iterdir()}
    assert main(args + ["--resume"]) == 0                         # everything reused, nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert main(args + ["--resume", "--also-measure", "zmask_cue"]) == 0       # transfer to the cued variant
    res = json.loads((out / "adaptive_ddrnet23_slim.json").read_text())
    assert set(res["also_measured"]["zmask_cue"]) == {"eot_L", "full_b0.5", "zscore_b0.5"}
    assert "measured on `zmask_cue`" in (out / "adaptive_ddrnet23_slim.md").read_text()


def test_adaptive_benchmark_errors(tmp_path, capsys):
    from benchmarks.adaptive import main
    assert main(["--model", "ddrnet23_slim", "--attackers", "nope"]) == 2
    assert "unknown attacker" in capsys.readouterr().err
    assert main(["--model", "ddrnet23_slim", "--betas", "1.5"]) == 2
    assert "betas must be in [0, 1]" in capsys.readouterr().err
    assert main(["--model", "ddrnet23_slim", "--library", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert main(["--model", "ddrnet23_slim", "--points", "full_bx"]) == 2
    assert "not <attacker>_b<beta" in capsys.readouterr().err
    assert main(["--model", "ddrnet23_slim", "--points", "other_b0.5"]) == 2
    assert main(["--model", "ddrnet23_slim", "--defense", "lgs"]) == 2
    assert "Z-Mask variant" in capsys.readouterr().err


def test_frontier_points_order():
    from benchmarks.adaptive import AdaptiveConfig, frontier_points
    assert frontier_points(AdaptiveConfig("m", points=["full_b1", "zscore_b0.5"])) == [("full", 1.0), ("zscore", 0.5)]
    assert frontier_points(AdaptiveConfig("m", attackers=["full"], betas=[1, 0.5])) == [("full", 1), ("full", 0.5)]
