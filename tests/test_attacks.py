"""Adversarial patches: exact paste masks, frame containment, gradients, loss pieces, EOT crafting
(determinism, resume, loss decrease on a real model), PNG round trip and the CLIs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from realtime.attacks import (PATCH_SIZES_1024x2048, CaptureConfig, EOTConfig, Placement, adversarial_loss,
                              apply_patch, craft_universal_patch, evaluate_patch, load_patch_png,
                              non_printability, patch_size_for, random_patch, sample_quads, save_patch_png,
                              total_variation)
from realtime.data import IGNORE_INDEX, CamVid

REPO = Path(__file__).resolve().parents[1]
QUAD = ((12.0, 8.0), (61.0, 4.0), (70.0, 44.0), (6.0, 52.0))
PLACEMENTS = {"fixed": Placement("fixed", top_left=(20, 30)), "random": Placement("random"),
              "quad": Placement("quad", corners_xy=QUAD)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shoelace(q: torch.Tensor) -> torch.Tensor:
    x, y = q[..., 0], q[..., 1]
    return 0.5 * (x * y.roll(-1, -1) - x.roll(-1, -1) * y).sum(-1).abs()


class TinySeg(nn.Module):
    """Small fully convolutional stand-in for a segmenter (fast, data-free)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 11, 3, padding=2, dilation=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_patch_sizes_match_the_paper_and_scale():
    for name, hw in PATCH_SIZES_1024x2048.items():
        assert patch_size_for(name, (1024, 2048)) == hw
    assert patch_size_for("L", (360, 480)) == (105, 141)
    assert patch_size_for("s", (512, 1024)) == (75, 150)
    with pytest.raises(KeyError):
        patch_size_for("XL", (360, 480))


@pytest.mark.parametrize("capture", [None, "physical"])
@pytest.mark.parametrize("mode", sorted(PLACEMENTS))
def test_mask_equals_changed_pixels(mode, capture):
    cap = CaptureConfig.physical() if capture else None
    if cap is not None:
        cap.p_blur = cap.p_noise = cap.p_jpeg = 1.0                     # exercise every transform
    images = torch.full((4, 3, 60, 80), 0.3141)
    images[:, :, :, :40] = 0.7183                                       # two regions, neither a patch value
    patch = torch.rand(3, 15, 20, generator=_gen(1))
    patched, mask = apply_patch(images, patch, PLACEMENTS[mode], cap, _gen(2))
    assert mask.shape == (4, 1, 60, 80) and set(mask.unique().tolist()) <= {0.0, 1.0}
    changed = (patched != images).any(1, keepdim=True)
    assert (changed <= mask.bool()).all(), "a pixel outside the mask was changed"
    assert torch.equal(changed.float(), mask), "mask and changed pixels differ"
    assert (mask.flatten(1).sum(1) > 0).all()
    assert patched.min() >= 0 and patched.max() <= 1


def test_fixed_paste_without_capture_is_the_patch_itself():
    images = torch.zeros(2, 3, 40, 50)
    patch = torch.rand(3, 10, 12, generator=_gen(0))
    patched, mask = apply_patch(images, patch, Placement("fixed", top_left=(7, 9)))
    expect = torch.zeros(2, 1, 40, 50)
    expect[:, :, 7:17, 9:21] = 1
    assert torch.equal(mask, expect)
    torch.testing.assert_close(patched[:, :, 7:17, 9:21], patch.expand(2, -1, -1, -1), atol=1e-5, rtol=0)


def test_quad_mask_covers_the_quadrilateral_area():
    images = torch.zeros(1, 3, 60, 80)
    _, mask = apply_patch(images, torch.rand(3, 20, 30, generator=_gen(0)), PLACEMENTS["quad"])
    q = torch.tensor(QUAD)
    perimeter = (q.roll(-1, 0) - q).norm(dim=1).sum()
    assert abs(float(mask.sum()) - float(_shoelace(q))) <= float(perimeter) / 2 + 2
    _, rect = apply_patch(images, torch.rand(3, 20, 30), Placement("quad", corners_xy=((5, 4), (35, 4), (35, 24), (5, 24))))
    assert float(rect.sum()) == 30 * 20 and float(rect[0, 0, 4:24, 5:35].sum()) == 600


def test_transforms_keep_the_patch_inside_the_frame():
    cap = CaptureConfig.physical()
    cap.scale, cap.rotation_deg, cap.perspective = (0.5, 2.5), 40.0, 0.2   # harsher than physical
    H, W = 48, 64
    for mode in ("random", "fixed", "quad"):
        place = Placement("fixed", top_left=(27, 33)) if mode == "fixed" else PLACEMENTS[mode]
        if mode == "quad":
            place = Placement("quad", corners_xy=((2, 2), (40, 1), (44, 30), (1, 33)))
        q = sample_quads(300, (H, W), (20, 30), place, cap, _gen(3))
        assert (q[..., 0] >= 0).all() and (q[..., 0] <= W).all() and (q[..., 1] >= 0).all() and (q[..., 1] <= H).all()
    # the rendered mask holds the whole quad: nothing was cut off at the border
    images = torch.zeros(64, 3, H, W)
    g1, g2 = _gen(5), _gen(5)
    q = sample_quads(64, (H, W), (20, 30), Placement("random"), cap, g1)
    _, mask = apply_patch(images, torch.rand(3, 20, 30), Placement("random"), cap, g2)
    area, perim = _shoelace(q), (q.roll(-1, 1) - q).norm(dim=2).sum(1)
    assert ((mask.flatten(1).sum(1) - area).abs() <= perim / 2 + 2).all()
    with pytest.raises(ValueError):
        apply_patch(images[:1], torch.rand(3, 20, 30), Placement("fixed", top_left=(40, 0)))


def test_gradient_reaches_every_patch_pixel():
    patch = torch.rand(3, 10, 12, generator=_gen(0)).requires_grad_(True)
    patched, _ = apply_patch(torch.zeros(3, 3, 40, 50), patch, Placement("fixed", top_left=(5, 5)))
    patched.sum().backward()
    torch.testing.assert_close(patch.grad, torch.full_like(patch, 3.0), atol=1e-4, rtol=0)
    patch.grad = None
    patched, _ = apply_patch(torch.zeros(3, 3, 40, 50), patch, Placement("random"), CaptureConfig.physical(), _gen(1))
    (patched ** 2).sum().backward()
    assert torch.isfinite(patch.grad).all() and patch.grad.abs().sum() > 0


def test_loss_pieces():
    labels = torch.tensor([[[0, 1, 2, IGNORE_INDEX]]])                   # (1,1,4)
    logits = torch.zeros(1, 11, 1, 4)
    logits[0, 0, 0, 0] = 5.0                                            # correct
    logits[0, 3, 0, 1] = 5.0                                            # wrong
    logits[0, 2, 0, 2] = 5.0                                            # correct, but under the patch
    mask = torch.tensor([[[[0.0, 0.0, 1.0, 0.0]]]])
    ce0 = -F.log_softmax(logits[0, :, 0, 0], 0)[0]
    ce1 = -F.log_softmax(logits[0, :, 0, 1], 0)[1]
    torch.testing.assert_close(adversarial_loss(logits, labels, mask), -ce0 / 2)
    torch.testing.assert_close(adversarial_loss(logits, labels, mask, "ce"), -(ce0 + ce1) / 2)
    assert float(total_variation(torch.full((3, 5, 5), 0.4))) == 0.0
    stripes = torch.zeros(3, 4, 4)
    stripes[:, :, 1::2] = 1.0
    assert float(total_variation(stripes)) == pytest.approx(1.0)
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(non_printability(stripes, palette)) < 1e-5
    assert float(non_printability(torch.full((3, 2, 2), 0.5), palette)) == pytest.approx(0.75, rel=1e-4)


def _synthetic(n: int = 4, hw=(32, 40)):
    g = _gen(7)
    images = (torch.rand(n, 3, *hw, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 11, (n, *hw), generator=g, dtype=torch.uint8)
    labels[:, :2] = IGNORE_INDEX
    return images, labels


def _tiny_cfg(**kw) -> EOTConfig:
    base = dict(hw=(8, 10), steps=2, batch_size=2, lr=0.05, seed=3, nps_weight=0.1, checkpoint_every=2)
    base.update(kw)
    return EOTConfig(**base)


def test_crafting_is_deterministic_and_resumable(tmp_path):
    images, labels = _synthetic()
    model = TinySeg().eval()
    a, hist = craft_universal_patch(model, images, labels, _tiny_cfg(), "cpu", progress=False)
    b, _ = craft_universal_patch(model, images, labels, _tiny_cfg(), "cpu", progress=False)
    c, _ = craft_universal_patch(model, images, labels, _tiny_cfg(seed=4), "cpu", progress=False)
    assert a.shape == (3, 8, 10) and len(hist) == 2 and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1
    full, _ = craft_universal_patch(model, images, labels, _tiny_cfg(steps=4), "cpu", progress=False)
    ckpt = tmp_path / "p.ckpt.pt"
    craft_universal_patch(model, images, labels, _tiny_cfg(steps=2), "cpu", progress=False, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2
    resumed, hist = craft_universal_patch(model, images, labels, _tiny_cfg(steps=4), "cpu", progress=False,
                                          checkpoint=ckpt)
    assert torch.equal(resumed, full) and [h["step"] for h in hist] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="different attack configuration"):
        craft_universal_patch(model, images, labels, _tiny_cfg(steps=5, lr=0.1), "cpu", progress=False,
                              checkpoint=ckpt)


def test_extra_loss_hook_and_beta():
    images, labels = _synthetic()
    model = TinySeg().eval()
    seen = []

    def extra(patched, mask, logits):
        seen.append((patched.shape, mask.shape, logits.shape))
        return (patched * mask).mean()                                  # darken the patch

    with pytest.raises(ValueError):
        craft_universal_patch(model, images, labels, _tiny_cfg(beta=0.5), "cpu", progress=False)
    cfg = _tiny_cfg(beta=0.0, tv_weight=0.0, nps_weight=0.0, steps=3, capture=CaptureConfig.none())
    start, _ = craft_universal_patch(model, images, labels, _tiny_cfg(steps=0), "cpu", progress=False)
    patch, hist = craft_universal_patch(model, images, labels, cfg, "cpu", progress=False, extra_loss=extra)
    assert len(seen) == 3 and seen[0][2] == (2, 11, 32, 40)
    assert float(patch.mean()) < float(start.mean()) - 0.05          # only the extra term drove the patch


@pytest.fixture(scope="module")
def small_real_frames():
    try:
        ds = CamVid(None, "train")
    except FileNotFoundError as exc:
        pytest.skip(f"real CamVid data not available: {exc}")
    images, labels = ds.to_tensors([0, 120])
    x = F.interpolate(images.float(), size=(180, 240), mode="bilinear", align_corners=False).round().to(torch.uint8)
    y = F.interpolate(labels[:, None].float(), size=(180, 240), mode="nearest")[:, 0].to(torch.uint8)
    return x, y


def test_few_steps_reduce_attack_loss_on_real_model(small_real_frames):
    from realtime.models import build_model
    model = build_model("ddrnet23_slim")
    images, labels = small_real_frames
    cfg = EOTConfig(size="L", steps=6, batch_size=2, lr=0.05, capture=CaptureConfig.none(),
                    placement=Placement("fixed", top_left=(40, 60)), seed=0)

    def loss_of(patch: torch.Tensor) -> float:
        with torch.no_grad():
            patched, mask = apply_patch(images.float() / 255, patch, cfg.placement)
            return float(adversarial_loss(model(patched), labels, mask))

    start, _ = craft_universal_patch(model, images, labels, EOTConfig(**{**cfg.__dict__, "steps": 0}), "cpu",
                                     progress=False)
    patch, hist = craft_universal_patch(model, images, labels, cfg, "cpu", progress=False)
    assert patch.shape == (3, 53, 70)
    assert loss_of(patch) < loss_of(start) - 1e-3
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_evaluate_patch_scores_outside_the_patch_only():
    images, labels = _synthetic(3)
    model = TinySeg().eval()
    res = evaluate_patch(model, images, labels, torch.rand(3, 8, 10), n_placements=2, generator=_gen(0))
    assert 0 <= res["patched_miou"] <= 1 and 0 <= res["clean_miou"] <= 1
    assert res["patch_area_fraction"] == pytest.approx(80 / (32 * 40))
    valid = int((labels != IGNORE_INDEX).sum())
    assert valid * 2 - res["pixels_scored"] <= 2 * 3 * 80 and res["pixels_scored"] < valid * 2
    again = evaluate_patch(model, images, labels, torch.rand(3, 8, 10, generator=_gen(1)), 2, _gen(0))
    same = evaluate_patch(model, images, labels, torch.rand(3, 8, 10, generator=_gen(1)), 2, _gen(0))
    assert again == same and again["clean_miou"] == res["clean_miou"]   # same placements, same clean pixels


def test_png_json_round_trip(tmp_path):
    patch = random_patch((9, 13), _gen(0))
    path = save_patch_png(patch, tmp_path / "sub" / "p.png", {"model": "m", "steps": 3})
    loaded, meta = load_patch_png(path)
    assert loaded.shape == patch.shape and (loaded - patch).abs().max() <= 0.5 / 255 + 1e-6
    assert meta == {"model": "m", "steps": 3, "hw": [9, 13]}
    assert json.loads(path.with_suffix(".json").read_text())["hw"] == [9, 13]
    again, _ = load_patch_png(save_patch_png(loaded, tmp_path / "q.png"))
    assert torch.equal(again, loaded)                                   # 8-bit values survive exactly


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_help_and_errors(tmp_path):
    r = _cli("realtime.attacks.craft", "--help")
    assert r.returncode == 0 and "Examples" in r.stdout
    r = _cli("realtime.attacks.craft", "--model", "nope", "--out", str(tmp_path / "p.png"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown model") and "Traceback" not in r.stderr
    r = _cli("realtime.attacks.craft", "--model", "ddrnet23_slim", "--data", str(tmp_path / "none"),
             "--out", str(tmp_path / "p.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = _cli("realtime.attacks.evaluate", "--model", "ddrnet23_slim", "--patch", str(tmp_path / "missing.png"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_random_patch_then_evaluate(tmp_path, camvid_root):
    out = tmp_path / "rand.png"
    r = _cli("realtime.attacks.craft", "--model", "ddrnet23_slim", "--size", "S", "--random", "--out", str(out))
    assert r.returncode == 0, r.stderr
    patch, meta = load_patch_png(out)
    assert patch.shape == (3, 53, 70) and meta["kind"] == "random" and len(meta["fingerprint"]) == 16
    res_path = tmp_path / "r.json"
    r = _cli("realtime.attacks.evaluate", "--model", "ddrnet23_slim", "--patch", str(out), "--limit", "2",
             "--json", str(res_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(res_path.read_text())
    assert res["frames"] == 2 and math.isfinite(res["patched_miou"]) and res["patch_hw"] == [53, 70]
