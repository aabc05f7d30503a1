"""Baseline defenses behind the common interface: LGS/SLGS/WLGS, FPDA/HN, TaintRadar (CPU, small inputs)."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from realtime.defenses.base import DefenseResult
from realtime.defenses.lgs import LGS, LGSConfig, SLGS, WLGS, gradient_magnitude, opening, windowed_gradient
from realtime.defenses.overactivation import (OverActivationCalibration, OverActivationMismatchError,
                                              deepest_layer, threshold_at_fpr)
from realtime.defenses.registry import REPO, DefenseContext, build_defense, list_defenses
from realtime.defenses.taintradar import TaintRadar, rank_of
from realtime.models import build_model

SHIPPED = REPO / "calibration" / "shipped"
LIBRARY = REPO / "realtime" / "attacks" / "library"


@pytest.fixture(scope="module")
def ddr() -> torch.nn.Module:
    return build_model("ddrnet23_slim")


def _smooth(h: int = 64, w: int = 96) -> torch.Tensor:
    """A smooth colour ramp: small, uniform gradients everywhere."""
    ramp = torch.linspace(0.2, 0.8, w).view(1, 1, 1, w).expand(1, 3, h, w)
    return ramp * torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1)


def _with_noise_patch(x: torch.Tensor, box: tuple) -> tuple:
    y0, x0, s = box
    out = x.clone()
    out[..., y0:y0 + s, x0:x0 + s] = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    gt = torch.zeros(1, 1, *x.shape[-2:])
    gt[..., y0:y0 + s, x0:x0 + s] = 1
    return out, gt


def _check_result(r: DefenseResult, d, n: int, h: int, w: int) -> None:
    assert r.output.shape == (n, 11, h, w) and r.defended_input.shape == (n, 3, h, w)
    if d.masks:
        assert r.mask.shape == (n, 1, h, w) and r.mask.is_floating_point()
        assert float(r.mask.min()) >= 0 and float(r.mask.max()) <= 1
    else:
        assert r.mask is None
    if d.flags:
        assert r.flagged.shape == (n,) and r.flagged.dtype == torch.bool
        assert r.score.shape == (n,) and r.score.is_floating_point()
    else:
        assert r.flagged is None


def test_registry_lists_every_baseline() -> None:
    assert {"lgs", "slgs", "wlgs", "fpda", "hn", "patchzero", "taintradar"} <= set(list_defenses())


@pytest.mark.parametrize("name", ["lgs", "slgs", "wlgs", "fpda", "hn", "taintradar", "patchzero"])
def test_build_defense_gives_well_formed_result(ddr, name: str) -> None:
    ctx = DefenseContext(ddr, "ddrnet23_slim")
    try:
        d = build_defense(name, ctx)
    except FileNotFoundError as exc:            # an artifact not fitted/trained in this checkout
        pytest.skip(str(exc))
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    stages = []
    with torch.no_grad():
        r = d(x, timer=lambda s: (stages.append(s), nullcontext())[1])
    _check_result(r, d, 2, 64, 96)
    assert stages, "the defense timed no stage"


def test_lgs_leaves_flat_image_unchanged(ddr) -> None:
    x = torch.full((1, 3, 48, 64), 0.4)
    r = LGS(ddr)(x)
    assert torch.equal(r.mask, torch.ones_like(r.mask)) and torch.equal(r.defended_input, x)


def test_lgs_masks_pasted_high_frequency_patch(ddr) -> None:
    x, gt = _with_noise_patch(_smooth(), (20, 30, 24))
    r = LGS(ddr)(x)
    removed = 1 - r.mask
    assert float((removed * gt).sum() / gt.sum()) > 0.5            # most of the patch suppressed
    assert float((removed * (1 - gt)).sum() / (1 - gt).sum()) < 0.1  # the smooth rest barely touched
    assert torch.allclose(r.defended_input, x * r.mask)


def test_lgs_windows_cover_the_border() -> None:
    x, gt = _with_noise_patch(_smooth(47, 53), (47 - 9, 53 - 9, 9))   # patch in the bottom-right corner
    g = windowed_gradient(x, LGSConfig())
    assert float((g > 0).float().mul(gt).sum()) > 0.5 * float(gt.sum())


def test_lgs_gradient_is_min_max_normalised() -> None:
    g = gradient_magnitude(_with_noise_patch(_smooth(), (5, 5, 10))[0])
    assert abs(float(g.min())) < 1e-6 and abs(float(g.max()) - 1) < 1e-6


def test_lgs_is_batch_consistent(ddr) -> None:
    a, _ = _with_noise_patch(_smooth(), (10, 10, 16))
    b = torch.rand(1, 3, 64, 96)
    both = LGS(ddr)(torch.cat([a, b]))
    assert torch.allclose(both.mask[1:], LGS(ddr)(b).mask)


def test_opening_removes_speckles_keeps_blobs() -> None:
    m = torch.zeros(1, 1, 20, 20)
    m[0, 0, 2, 2] = 1
    m[0, 0, 8:14, 8:14] = 1
    o = opening(m)
    assert o[0, 0, 2, 2] == 0 and torch.equal(o[0, 0, 8:14, 8:14], torch.ones(6, 6))


@pytest.mark.parametrize("cls", [SLGS, WLGS])
def test_saliency_lgs_masks_only_high_gradient_areas(ddr, cls) -> None:
    d = cls(ddr)
    assert d.needs_grad and d.masks
    flat = torch.full((1, 3, 48, 64), 0.4)
    with torch.no_grad():
        assert torch.equal(d(flat).mask, torch.ones(1, 1, 48, 64))
    x, gt = _with_noise_patch(_smooth(), (20, 30, 24))
    with torch.inference_mode():                      # gradients still reachable (clone outside)
        r = d(x)
    removed = 1 - r.mask
    assert float(removed.sum()) > 0
    assert float((removed * gt).sum() / removed.sum()) > 0.9        # nothing masked outside the patch area
    assert r.extras["saliency"].shape == (1, 1, 64, 96) and float(r.extras["saliency"].max()) > 0


def test_threshold_at_fpr() -> None:
    scores = torch.arange(200, dtype=torch.float32)
    t = threshold_at_fpr(scores, 0.01)
    assert int((scores > t).sum()) == 2 and t == 197


def test_deepest_layer_per_model() -> None:
    from realtime.defenses.artifact import load_calibration
    expected = {"ddrnet23_slim": "layer3", "bisenetv1": "context_path.backbone.layer3"}
    for name, layer in expected.items():
        m = build_model(name)
        deep = load_calibration(SHIPPED / f"{name}.safetensors", m).config.deep
        assert deepest_layer(m, deep) == layer


def _shipped_overactivation(name: str) -> Path:
    path = SHIPPED / f"{name}_overactivation.json"
    if not path.is_file():
        pytest.skip(f"{path} not fitted (python -m realtime.defenses.overactivation --model {name})")
    return path


def test_overactivation_refuses_another_model(ddr, tmp_path: Path) -> None:
    raw = json.loads(_shipped_overactivation("ddrnet23_slim").read_text())
    assert raw["split"] == "train" and raw["frames"] > 0
    OverActivationCalibration.load(SHIPPED / "ddrnet23_slim_overactivation.json", ddr)     # matches
    raw["fingerprint"] = "0" * 16
    (tmp_path / "ddrnet23_slim_overactivation.json").write_text(json.dumps(raw))
    with pytest.raises(OverActivationMismatchError, match="fingerprint"):
        build_defense("fpda", DefenseContext(ddr, "ddrnet23_slim", artifacts=tmp_path))
    with pytest.raises(OverActivationMismatchError):
        OverActivationCalibration.load(SHIPPED / "ddrnet23_slim_overactivation.json", build_model("bisenetv1"))
    with pytest.raises(FileNotFoundError, match="overactivation"):
        build_defense("hn", DefenseContext(ddr, "ddrnet23_slim", artifacts=tmp_path / "none"))


def _val_frame_and_patched(camvid_root: Path, model_name: str, index: int = 0) -> tuple:
    from realtime.attacks.apply import Placement, apply_patch, load_patch_png
    from realtime.data import CamVid
    img, _ = CamVid(camvid_root, "val").to_tensors([index])
    x = img.float().div(255)
    patch, _ = load_patch_png(LIBRARY / f"{model_name}_eot_L.png")
    xp, m = apply_patch(x, patch, Placement("fixed", top_left=(150, 170)))
    return x, xp, m


@pytest.mark.parametrize("name", ["fpda", "hn"])
def test_overactivation_flags_patched_frame_not_clean(ddr, camvid_root: Path, name: str) -> None:
    _shipped_overactivation("ddrnet23_slim")
    d = build_defense(name, DefenseContext(ddr, "ddrnet23_slim"))
    assert d.flags and not d.masks
    x, xp, _ = _val_frame_and_patched(camvid_root, "ddrnet23_slim")
    with torch.no_grad():
        r = d(torch.cat([x, xp]))
    assert r.flagged.tolist() == [False, True], (r.score.tolist(), d.threshold)
    assert r.defended_input is not None and torch.equal(r.output, r.first_output)


def test_taintradar_sane_and_batch_correct(ddr) -> None:
    d = build_defense("taintradar", DefenseContext(ddr, "ddrnet23_slim"))
    assert isinstance(d, TaintRadar) and d.needs_grad
    x, _ = _with_noise_patch(_smooth(), (20, 30, 24))
    b = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = d(torch.cat([x, b]))
        alone = d(b)
    _check_result(both, d, 2, 64, 96)
    assert not both.output.requires_grad
    assert both.flagged[1] == alone.flagged[0] and both.score[1] == alone.score[0]
    assert torch.equal(both.mask[1:], alone.mask)
    unflagged = ~both.flagged
    assert torch.equal(both.mask[unflagged], torch.ones_like(both.mask[unflagged]))
    with torch.inference_mode():
        again = d(torch.cat([x, b]))
    assert torch.equal(again.flagged, both.flagged)


def test_rank_of() -> None:
    assert rank_of(torch.tensor([0.1, 3.0, 2.0, 5.0]), 2) == 2 and rank_of(torch.tensor([1.0, 0.0]), 0) == 0
