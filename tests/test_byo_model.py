"""Bring your own model and footage: ``torchvision:NAME`` / ``package.module:factory`` specs, automatic
candidate layers, and calibration from unlabeled frames through to a defended run (plumbing)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from realtime.models import build_model, fingerprint, model_arg, model_slug, save_weights
from realtime.models.external import discover_layers, parse_spec

TV = "torchvision:lraspp_mobilenet_v3_large"


def test_spec_grammar_and_errors():
    assert parse_spec("torchvision:lraspp_mobilenet_v3_large,num_classes=5") == \
        ("torchvision", "lraspp_mobilenet_v3_large", {"num_classes": 5})
    assert model_slug(TV) == "torchvision-lraspp_mobilenet_v3_large" and model_slug("bisenetv1") == "bisenetv1"
    assert model_arg(TV) == TV and model_arg("ddrnet23_slim") == "ddrnet23_slim"
    with pytest.raises(ValueError, match="registered"):
        model_arg("nope")
    with pytest.raises(KeyError, match="no segmentation or detection builder"):
        build_model("torchvision:not_a_builder")
    with pytest.raises(KeyError, match="cannot import"):
        build_model("no_such_package.mod:factory")
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("torchvision:x,oops")


def test_torchvision_segmenter_keeps_its_checkpoint_format(tmp_path):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large
    model = build_model(TV, weights=None)
    plain = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)
    assert set(model.state_dict()) == set(plain.state_dict())        # a user's own checkpoint loads as is
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 11, 64, 96) and model.task == "segmentation"
    spec = model.layers()
    assert spec.candidates and set(spec.shallow) <= set(spec.candidates) and set(spec.deep) <= set(spec.candidates)
    modules = dict(model.named_modules())
    assert all(n in modules for n in spec.candidates)
    torch.save(plain.state_dict(), tmp_path / "own.pt")
    loaded = build_model(TV, weights=str(tmp_path / "own.pt"))
    assert fingerprint(loaded) != fingerprint(model)                  # other weights, other fingerprint
    assert fingerprint(build_model(TV, weights=None)) == fingerprint(model)   # seeded init: reproducible


def test_custom_factory_normalisation_and_layers(tmp_path, monkeypatch):
    (tmp_path / "byo_net.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Net(nn.Module):
            input_mean = (0.5, 0.5, 0.5)
            input_std = (0.25, 0.25, 0.25)

            def __init__(self, classes=3):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
                self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.ReLU())
                                              for c in (8, 16, 32, 64)])
                self.head = nn.Conv2d(128, classes, 1)
                self.seen = None

            def forward(self, x):
                self.seen = x
                return {"out": self.head(self.stages(self.stem(x)))}

        def build(classes=3):
            return Net(classes)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("byo_net:build,classes=4", weights=None)
    x = torch.full((1, 3, 64, 64), 0.75)
    y = model(x)
    assert y.shape == (1, 4, 64, 64)                                  # upsampled to the input
    assert torch.allclose(model.seen, torch.ones_like(x))             # (0.75 - 0.5) / 0.25
    assert torch.allclose(model.mean_color.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    spec = model.layers()
    assert spec.candidates == ("stages.0", "stages.1", "stages.2", "stages.3")   # strides 4..32, not the stem's 2
    assert spec.shallow == ("stages.0", "stages.1") and spec.deep == ("stages.2", "stages.3")
    assert discover_layers(model, (64, 64)).candidates == spec.candidates


def _folder(path: Path, n: int = 5) -> Path:
    import cv2
    path.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(n):
        img = (g.random((64, 96, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(path / f"{i:03d}.png"), img)
    return path


def test_unlabeled_calibration_then_a_defended_run(tmp_path, capsys):
    """CI plumbing: ``--weights none`` -> calibration.fit --frames <folder> -> realtime.run on it."""
    from calibration import fit
    from realtime import run
    frames = _folder(tmp_path / "frames")
    cal = tmp_path / "cal.safetensors"
    rc = fit.main(["--model", TV, "--weights", "none", "--frames", str(frames), "--imgsz", "64x96",
                   "--craft-steps", "2", "--craft-sizes", "L", "--fusion-steps", "10", "--n-shallow", "1",
                   "--n-deep", "1", "--out", str(cal), "--report-dir", str(tmp_path / "report"), "--device", "cpu"])
    assert rc == 0 and cal.is_file()
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == TV and report["shallow"] and report["deep"]
    out = tmp_path / "run.mp4"
    rc = run.main(["--model", TV, "--weights", "none", "--calibration", str(cal), "--source", str(frames),
                   "--imgsz", "64x96", "--output", str(out), "--quiet", "--device", "cpu"])
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert rc == 0 and summary["frames"] == 5 and summary["defense"] == "zmask" and summary["defense_errors"] == 0
    assert summary["calibration_model"] == TV


def test_precise_bn_recomputes_running_statistics():
    from realtime.models.evaluate import recompute_bn_stats
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.01)).eval()
    images = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert recompute_bn_stats(net, images, batch_size=6) == 1
    x = images.float() / 255
    bn = net[0]
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-6)
    assert bn.momentum == 0.01 and not net.training                   # settings restored


def test_crafted_sources_use_the_labels_when_there_are_any():
    """``--sources craft`` crafts against the given labels (``label-eot-*``); footage, with none, against the
    model's own predictions (``pseudo-eot-*``); a detector or zero steps cannot craft and says so."""
    from calibration import fit
    torch.manual_seed(0)
    model = build_model(TV, weights=None).eval()
    fp = fingerprint(model)
    images = torch.randint(0, 256, (4, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(4, 64, 96, dtype=torch.uint8)
    args = fit.parse_args(["--model", TV, "--sources", "craft", "--craft-steps", "1", "--craft-sizes", "L",
                           "--craft-batch", "2", "--batch-size", "2", "--patches", ""])
    _sources, info = fit.crafted_sources(args, model, images, labels, (64, 96), fp, "segmentation")
    assert [i["name"] for i in info] == ["label-eot-L"] and info[0]["steps"] == 1
    _sources, info = fit.crafted_sources(args, model, images, None, (64, 96), fp, "segmentation")
    assert [i["name"] for i in info] == ["pseudo-eot-L"]
    with pytest.raises(ValueError, match="--sources craft"):
        fit.crafted_sources(args, model, images, labels, (64, 96), fp, "detection")
