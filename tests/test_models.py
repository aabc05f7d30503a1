import json

import pytest
import torch

from realtime.models import build_model, default_weights_path, fingerprint, list_models, load_weights, save_weights


def test_registry_lists_and_rejects():
    assert {"ddrnet23_slim", "bisenetv1"} <= set(list_models())
    with pytest.raises(KeyError, match="available"):
        build_model("resnet9000", weights=None)


@pytest.mark.parametrize("name", ["ddrnet23_slim", "bisenetv1"])
def test_forward_shapes_layers_and_aux(name):
    m = build_model(name, weights=None)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        assert m(x).shape == (2, 11, 96, 128)
    spec = m.layers()
    modules = dict(m.named_modules())
    for layer in spec.shallow + spec.deep + spec.candidates + tuple(spec.aliases.values()):
        assert layer in modules, layer
    m.train()
    out, aux = m(x)
    assert out.shape == (2, 11, 96, 128) and len(aux) == len(type(m).aux_weights)
    with pytest.raises(ValueError, match="N,3,H,W"):
        m(torch.rand(3, 96, 128))


def test_ddrnet_paper_aliases():
    spec = build_model("ddrnet23_slim", weights=None).layers()
    assert spec.resolve(["rbb2", "rbb1", "rb1", "rb2"]) == ["layer5", "layer5_", "layer3_", "layer4_"]
    assert spec.resolve(["layer1"]) == ["layer1"]


def test_ddrnet_slim_size():
    m = build_model("ddrnet23_slim", weights=None)
    n = sum(p.numel() for p in m.parameters())
    assert 5.5e6 < n < 6.0e6  # DDRNet-23-slim is published as 5.7 M parameters


def test_fingerprint_tracks_weights_not_device_or_precision(tmp_path):
    torch.manual_seed(0)
    a = build_model("ddrnet23_slim", weights=None)
    path = save_weights(a, tmp_path / "w.pt", meta={"note": "x"}, half=True)
    b = build_model("ddrnet23_slim", weights=path)
    c = build_model("ddrnet23_slim", weights=path)
    assert fingerprint(b) == fingerprint(c)
    assert fingerprint(b) == fingerprint(c.half())            # precision it is cast to does not matter
    with torch.no_grad():
        b.final_layer[-1].bias[0] += 1.0
    assert fingerprint(b) != fingerprint(c)
    assert json.loads((tmp_path / "w.json").read_text()) == {"note": "x"}


def test_loading_weights_of_another_model_fails(tmp_path):
    path = save_weights(build_model("bisenetv1", weights=None), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="another model"):
        build_model("ddrnet23_slim", weights=path)
    with pytest.raises(FileNotFoundError):
        build_model("ddrnet23_slim", weights=tmp_path / "missing.pt")


@pytest.mark.parametrize("name", ["ddrnet23_slim", "bisenetv1"])
def test_shipped_weights_are_fp16_and_documented(name):
    path = default_weights_path(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    meta = load_weights(build_model(name, weights=None), path)
    assert meta["model"] == name and meta["val_miou_fp16_weights"] > 0.5
    assert meta["fingerprint"] == fingerprint(build_model(name))
