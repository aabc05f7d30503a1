"""Detectors: registry, the paper's layer sets by name, batch interface, mAP (pycocotools), training pieces."""
from __future__ import annotations

import types

import pytest
import torch

from realtime.core import compat
from realtime.models.layersets import LAYER_SETS, PAPER_SETS, layer_spec_for
from realtime.core.box_metrics import coco_map
from realtime.models.registry import build_model, list_models
from realtime.train_detection import DetTrainConfig, DetTrainer, augment
from realtime.models import build_model, list_models
from realtime.models.registry import model_task


@pytest.mark.parametrize("name", sorted(LAYER_SETS))
def test_layer_sets_resolve_by_name(name: str) -> None:
    model = build_model(name, weights=None, **({"trunk_weights": None} if name == "fcos_ddrnet" else {}))
    modules = dict(model.named_modules())
    spec = model.layers()
    for layer in (*spec.shallow, *spec.deep, *spec.candidates):
        assert layer in modules, f"{name}: {layer} is not a module"
    assert model_task(model) == "detection" and model.class_names[0] == "car"


def test_paper_sets_are_the_documented_ones() -> None:
    r50 = layer_spec_for("retinanet_resnet50_fpn")
    assert r50 is layer_spec_for("fasterrcnn_resnet50_fpn")
    assert r50.shallow == ("backbone.body.relu", "backbone.body.conv1", "backbone.body.layer1.0.conv1")
    assert r50.deep == ("backbone.body.conv1", "backbone.body.layer4", "backbone.body.layer1.0.conv1")
    ssd = layer_spec_for("ssd300_vgg16")
    assert ssd.shallow == ("backbone.extra.0.3", "backbone.extra.0.1")
    assert ssd.deep == ("backbone.extra.0.3", "backbone.extra.0.5")
    ddr = layer_spec_for("fcos_ddrnet")
    assert ddr.resolve(["rbb2", "rb1"]) == ["backbone.body.layer5", "backbone.body.layer3_"]
    assert set(PAPER_SETS) <= set(LAYER_SETS)
    with pytest.raises(KeyError, match="known"):
        layer_spec_for("yolo")


def test_registry_and_model_interface(tmp_path) -> None:
    assert set(list_models("detection")) == set(list_models("detection")) and "fcos_ddrnet" in list_models()
    assert "fcos_ddrnet" not in list_models("segmentation")
    with pytest.raises(KeyError, match="available"):
        build_model("yolo")
    with pytest.raises(FileNotFoundError, match="check the path"):
        build_model("fcos_ddrnet", weights=tmp_path / "missing.pt")
    torch.manual_seed(0)
    model = build_model("fcos_ddrnet", weights=None)       # routed to the detector registry
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 128))
        out_list = model([torch.rand(3, 96, 128)])
    assert len(out) == 2 and len(out_list) == 1
    assert set(out[0]) == {"boxes", "scores", "labels"} and out[0]["boxes"].shape[1] == 4
    assert torch.allclose(model.mean_color.view(3), torch.tensor(model.transform.image_mean))
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        model(torch.rand(2, 1, 96, 128))


def test_detector_taps_cover_the_image() -> None:
    """size_divisible=8: a 360x480 frame is not padded, so the hooked 1/8 maps are exactly 45x60."""
    from realtime.defenses import ActivationTaps
    model = build_model("fcos_ddrnet", weights=None, trunk_weights=None)
    spec = model.layers()
    with torch.no_grad(), ActivationTaps(model, [*spec.shallow]) as taps:
        _, maps = taps(torch.rand(1, 3, 360, 480))
    assert maps["backbone.body.layer3_"].shape[-2:] == (45, 60)
    assert maps["backbone.body.layer5"].shape[-2:] == (6, 8)


def _t(boxes, labels, scores=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    return d


def test_coco_map_hand_cases() -> None:
    names = ("car", "pedestrian")
    gt = [_t([[10, 10, 60, 40], [100, 100, 130, 180]], [1, 2]), _t([[200, 50, 260, 90]], [1])]
    perfect = [_t(g["boxes"].tolist(), g["labels"].tolist(), [0.9] * len(g["labels"])) for g in gt]
    res = coco_map(perfect, gt, names)
    assert res["map_50"] == pytest.approx(1.0) and res["map"] == pytest.approx(1.0)
    # car: a true positive then a false positive at a lower score; recall 0.5 -> 51 of 101 recall points
    one_car = [_t([[10, 10, 60, 40], [300, 300, 340, 340]], [1, 1], [0.9, 0.8]), _t([], [], [])]
    res = coco_map(one_car, gt, names)
    assert res["ap50_per_class"]["car"] == pytest.approx(51 / 101)
    assert res["ap50_per_class"]["pedestrian"] == 0.0
    shifted = [_t([[40, 10, 90, 40]], [1], [0.9]), _t([], [], [])]          # IoU 20/80 with the car
    assert coco_map(shifted, gt, names)["ap50_per_class"]["car"] == 0.0
    assert coco_map([_t([], [], []), _t([], [], [])], gt, names)["map_50"] == 0.0
    with pytest.raises(ValueError, match="predictions"):
        coco_map(perfect[:1], gt, names)


def test_augment_moves_boxes_with_pixels() -> None:
    img = torch.zeros(3, 120, 160, dtype=torch.uint8)
    img[:, 40:80, 20:60] = 255                                   # a white object at x 20-60, y 40-80
    target = _t([[20, 40, 60, 80]], [1])
    for seed in range(6):
        x, t = augment(img, target, torch.Generator().manual_seed(seed), zoom_max=1.6)
        assert x.shape == (3, 120, 160) and x.dtype == torch.float32
        if len(t["boxes"]) == 0:
            continue
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        inside = x[0, int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2]
        assert inside.numel() > 0 and inside.std() < 0.05        # the box still sits on the object
        outside = x[0].clone()
        outside[max(int(y1) - 2, 0):int(y2) + 2, max(int(x1) - 2, 0):int(x2) + 2] = outside.min()
        assert outside.max() <= inside.mean() - 0.2              # ... and the object is not outside it


def test_trainer_runs_checkpoints_and_resumes(camvid_root, tmp_path) -> None:
    cfg = DetTrainConfig(data=str(camvid_root), out=str(tmp_path / "run"), epochs=1, batch_size=2, limit=4,
                         val_limit=2, eval_every=1, warmup_iters=1, device="cpu")
    first = DetTrainer(cfg).fit()
    assert first["epochs"] == 1 and (tmp_path / "run" / "last.pt").is_file() and 0 <= first["best_map_50"] <= 1
    again = DetTrainer(dataclass_replace(cfg, epochs=2))
    assert again.epoch == 1 and again.it == 2                   # resumed, not restarted
    assert again.fit()["epochs"] == 2


def dataclass_replace(cfg: DetTrainConfig, **kw) -> DetTrainConfig:
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_nms_fallback_inactive_when_torchvision_loads(monkeypatch) -> None:
    """A torchvision whose compiled ops load is returned as is: no op defined, nothing patched."""
    fake = types.ModuleType("torchvision")
    calls = []
    monkeypatch.setattr(compat.importlib, "import_module", lambda name: calls.append(name) or fake)
    monkeypatch.setattr(compat, "_fallback_library", lambda: pytest.fail("fallback must stay inactive"))
    assert compat.import_torchvision() is fake and calls == ["torchvision"]
