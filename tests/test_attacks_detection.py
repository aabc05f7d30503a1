"""Detection attacks: differentiable detector losses, the eot/apricot objectives, universal crafting with
checkpoint/resume, and the craft_detection CLI (random-head fcos_ddrnet: no trained weights needed)."""
import json
from pathlib import Path

import pytest
import torch

from realtime.attacks.apply import CaptureConfig, Placement, apply_patch, load_patch_png
from realtime.attacks.craft_detection import main as craft_main
from realtime.attacks.detection import (DetectionAttackConfig, attack_targets, covered_fraction, craft_detection_patch,
                                        detection_losses, mask_bbox)
from realtime.attacks.scene import BUILDING, ROAD, SceneConfig
from realtime.models.registry import build_model
from realtime.models import fingerprint

H, W = 120, 160


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many small ops: one intra-op thread is much faster on a busy CPU than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fcos():
    """Random-head fcos_ddrnet; its transform keeps the small synthetic frames at their size (fast on CPU)."""
    torch.manual_seed(0)
    model = build_model("fcos_ddrnet", weights=None)
    model.transform.min_size, model.transform.max_size = (H,), W
    return model


def _frames(n: int = 2):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, H, W), generator=g, dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [90.0, 30.0, 150.0, 100.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(n)]
    targets[-1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}   # frame without objects
    return images, targets


def test_losses_are_finite_and_reach_the_input(fcos):
    images, targets = _frames()
    x = (images.float() / 255).requires_grad_(True)
    losses = detection_losses(fcos, x, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert not fcos.training                                            # eval mode kept: BatchNorm frozen
    g, = torch.autograd.grad(losses["classification"] + losses["bbox_regression"], x)
    assert bool(torch.isfinite(g).all()) and float(g[0].abs().sum()) > 0
    with pytest.raises(NotImplementedError, match="FCOS and RetinaNet"):
        detection_losses(torch.nn.Conv2d(3, 3, 1), x, targets)


def test_retinanet_losses():
    torch.manual_seed(0)
    model = build_model("retinanet_resnet50_fpn", weights=None)
    model.transform.min_size, model.transform.max_size = (H,), W
    images, targets = _frames(2)
    images, targets = images[:1], targets[:1]                           # the frame with two boxes
    x = (images.float() / 255).requires_grad_(True)
    losses = detection_losses(model, x, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    g, = torch.autograd.grad(sum(losses.values()), x)
    assert float(g.abs().sum()) > 0


def test_objective_validation():
    with pytest.raises(ValueError, match="w_class < 0"):
        DetectionAttackConfig(kind="eot", w_class=0.0)
    with pytest.raises(ValueError, match="w_class < 0"):
        DetectionAttackConfig(kind="eot", w_class=1.0)
    with pytest.raises(ValueError, match="apricot"):
        DetectionAttackConfig(kind="apricot", w_class=-1.0)
    with pytest.raises(ValueError, match="kind"):
        DetectionAttackConfig(kind="targeted")
    eot, apr = DetectionAttackConfig(), DetectionAttackConfig(kind="apricot")
    assert (eot.w_class, eot.w_regr) == (-1.0, 0.1) and apr.w_class > 0 and apr.w_regr > 0
    assert eot.patch_hw((360, 480)) == (150, 150) and DetectionAttackConfig(size="S").patch_hw((360, 480)) == (75, 75)


def test_targets_drop_covered_boxes_and_add_the_patch_box():
    x = torch.zeros(1, 3, H, W)
    _, mask = apply_patch(x, torch.ones(3, 40, 50), Placement("fixed", top_left=(20, 10)))
    assert mask_bbox(mask[0]).tolist() == [10.0, 20.0, 60.0, 60.0]
    t = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [20.0, 30.0, 40.0, 50.0], [100.0, 0.0, 150.0, 50.0]]),
          "labels": torch.tensor([2, 3, 4])}]
    cov = covered_fraction(t[0]["boxes"], mask[0])
    assert torch.allclose(cov, torch.tensor([0.8, 1.0, 0.0]))
    eot = attack_targets(t, mask, "eot", max_covered=0.5)[0]
    assert eot["boxes"].tolist() == [[100.0, 0.0, 150.0, 50.0]] and eot["labels"].tolist() == [4]
    apr = attack_targets(t, mask, "apricot", target_label=1, max_covered=0.9)[0]
    assert apr["boxes"].tolist() == [[10.0, 20.0, 60.0, 70.0], [100.0, 0.0, 150.0, 50.0], [10.0, 20.0, 60.0, 60.0]]
    assert apr["labels"].tolist() == [2, 4, 1]
    # under the physical capture (rotation, perspective) the fake box is still the mask's bounding box
    _, m2 = apply_patch(torch.zeros(2, 3, H, W), torch.ones(3, 30, 30), Placement("random"), CaptureConfig.physical(),
                        torch.Generator().manual_seed(0))
    for tgt, m in zip(attack_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2,
                                     m2, "apricot", target_label=1), m2):
        ys, xs = torch.nonzero(m[0] > 0.5, as_tuple=True)
        assert tgt["boxes"][-1].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_crafting_changes_patch_and_resume_continues(fcos, tmp_path):
    images, targets = _frames()
    cfg = dict(kind="eot", hw=(24, 24), batch_size=2, lr=0.05, seed=3, checkpoint_every=1)
    init = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(3))
    full, hist = craft_detection_patch(fcos, images, targets, DetectionAttackConfig(steps=2, **cfg), "cpu",
                                       progress=False)
    assert full.shape == (3, 24, 24) and 0.0 <= float(full.min()) and float(full.max()) <= 1.0
    assert float((full - init).abs().max()) > 1e-3
    assert len(hist) == 2 and all(h["gt"] >= 0 for h in hist) and all(torch.isfinite(torch.tensor(h["loss"]))
                                                                       for h in hist)
    ckpt = tmp_path / "p.ckpt.pt"
    craft_detection_patch(fcos, images, targets, DetectionAttackConfig(steps=1, **cfg), "cpu", progress=False,
                          checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    resumed, hist2 = craft_detection_patch(fcos, images, targets, DetectionAttackConfig(steps=2, **cfg), "cpu",
                                           progress=False, checkpoint=ckpt)
    assert len(hist2) == 2 and hist2[0] == pytest.approx(hist[0])
    assert torch.allclose(resumed, full, atol=1e-5)                     # same as the uninterrupted run
    with pytest.raises(ValueError, match="different attack configuration"):
        craft_detection_patch(fcos, images, targets, DetectionAttackConfig(steps=4, **{**cfg, "lr": 0.1}), "cpu",
                              progress=False, checkpoint=ckpt)


def test_apricot_crafting_runs(fcos):
    images, targets = _frames()
    patch, hist = craft_detection_patch(fcos, images, targets, DetectionAttackConfig(
        kind="apricot", hw=(24, 24), steps=1, batch_size=2, capture=CaptureConfig.none()), "cpu", progress=False)
    assert hist[0]["gt"] == 2 + 2            # frame 0: 2 GT boxes (+1 fake), frame 1: none (+1 fake)
    with pytest.raises(ValueError, match="unknown target class"):
        craft_detection_patch(fcos, images, targets, DetectionAttackConfig(kind="apricot", target_class="truck",
                                                                            hw=(8, 8), steps=1), "cpu", progress=False)


def _street_labels(n: int) -> torch.Tensor:
    """(n,H,W) uint8 label maps: buildings on the left, a road converging to the centre (facade posters fit)."""
    lab = torch.zeros(H, W, dtype=torch.uint8)
    lab[10:90, : W // 2 - 12] = BUILDING
    for y in range(50, H):
        half = int((y - 50) * 1.2) + 2
        lab[y, max(W // 2 - half, 0): W // 2 + half] = ROAD
    return lab.expand(n, H, W).clone()


def test_scene_placement_crafts_through_the_poster_renderer(fcos, monkeypatch):
    images, targets = _frames()
    cfg = DetectionAttackConfig(kind="apricot", hw=(24, 24), steps=1, batch_size=2, capture=CaptureConfig.none(),
                                scene=SceneConfig(candidates=3))
    with pytest.raises(ValueError, match="label maps"):
        craft_detection_patch(fcos, images, targets, cfg, "cpu", progress=False)
    seen = []
    real = attack_targets

    def spy(tgts, mask, *a, **k):               # the masks the loss sees: perspective posters on the facade
        seen.append(mask.detach().clone())
        return real(tgts, mask, *a, **k)

    monkeypatch.setattr("realtime.attacks.detection.attack_targets", spy)
    init = torch.full((3, 24, 24), 0.5)
    patch, hist = craft_detection_patch(fcos, images, targets, cfg, "cpu", progress=False, init=init,
                                        labels_u8=_street_labels(2))
    assert float((patch - init).abs().max()) > 1e-4 and hist[0]["gt"] == 2 + 2
    m = seen[0][:, 0] > 0.5
    on = _street_labels(2)[m]
    assert m.any() and float((on == BUILDING).float().mean()) >= 0.5       # posters sit on the building
    assert all(int(mi.sum()) != 24 * 24 for mi in m)                       # not the axis-aligned 24x24 square


def test_non_detector_refused(capsys, tmp_path):
    assert craft_main(["--model", "ddrnet23_slim", "--kind", "eot", "--out-dir", str(tmp_path)]) == 2
    assert "realtime.attacks.craft" in capsys.readouterr().err
    seg = torch.nn.Conv2d(3, 11, 1)
    with pytest.raises(ValueError, match="realtime.attacks.craft"):
        craft_detection_patch(seg, *_frames(), DetectionAttackConfig(hw=(8, 8), steps=1), "cpu", progress=False)


def test_cli_writes_patch_and_sidecar(camvid_root, fcos, tmp_path):
    weights = tmp_path / "fcos.pt"
    torch.save({"model": fcos.state_dict()}, weights)
    common = ["--model", "fcos_ddrnet", "--weights", str(weights), "--data", str(camvid_root), "--size", "S",
              "--out-dir", str(tmp_path), "--device", "cpu", "--quiet"]
    assert craft_main(common + ["--kind", "eot", "--steps", "1", "--batch-size", "1", "--limit", "2",
                                "--checkpoint-every", "1"]) == 0
    png = tmp_path / "fcos_ddrnet_eot_S.png"
    patch, meta = load_patch_png(png)
    assert patch.shape == (3, 75, 75) and meta["hw"] == [75, 75] and meta["frame_hw"] == [360, 480]
    assert meta["fingerprint"] == fingerprint(fcos) and meta["task"] == "detection" and meta["kind"] == "eot"
    assert meta["objective"]["w_class"] == -1.0 and meta["frames"] == 2 and meta["steps"] == 1
    assert (tmp_path / "fcos_ddrnet_eot_S.ckpt.pt").is_file()
    assert craft_main(common + ["--kind", "eot", "--steps", "2", "--batch-size", "1", "--limit", "2",
                                "--resume"]) == 0
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["steps"] == 2 and [h["step"] for h in meta["history"]] == [1, 2]
    assert craft_main(common + ["--kind", "eot", "--steps", "1", "--batch-size", "1", "--limit", "2",
                                "--placement", "scene", "--init", str(png)]) == 0
    pmeta = json.loads((tmp_path / "fcos_ddrnet_physeot_S.json").read_text())
    assert pmeta["placement"] == "scene" and pmeta["init"] == str(png) and pmeta["config"]["scene"] is not None
    assert craft_main(common + ["--kind", "eot", "--placement", "scene", "--init", str(tmp_path / "none.png")]) == 2
    assert craft_main(common + ["--kind", "random"]) == 0
    rmeta = json.loads((tmp_path / "fcos_ddrnet_random_S.json").read_text())
    assert rmeta["kind"] == "random" and rmeta["hw"] == [75, 75] and rmeta["steps"] == 0
    assert craft_main(common + ["--kind", "apricot", "--target-class", "truck"]) == 2
    assert not Path(tmp_path / "fcos_ddrnet_apricot_S.png").exists()
