"""The outlier cue's per-cell |z| on the CPU kernel (kernels.cpu.CpuMeanAbsZ, routed by FusedRouter.mean_abs_z)
against its plain-torch reference (OutlierCue.mean_abs), and zmask_cue with the kernel against zmask_cue without.

Skipped (saying why) where no C compiler exists."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu as C
from kernels.backend import heatmap_backend
from realtime.defenses import SPRConfig
from realtime.defenses.cue import OutlierCue
from realtime.defenses.registry import REPO, DefenseContext, build_defense
from realtime.models import build_model

needs_cc = pytest.mark.skipif(not C.cpu_available()[0], reason=f"CPU kernel unavailable: {C.cpu_available()[1]}")
CAL = REPO / "calibration" / "shipped" / "ddrnet23_slim.safetensors"


def _cue(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = tuple(shapes)
    mu = {n: torch.randn(s[1], generator=g) for n, s in shapes.items()}
    sigma = {n: torch.rand(s[1], generator=g) + 0.3 for n, s in shapes.items()}
    taps = {n: torch.randn(*s, generator=g) * 2 + 0.5 for n, s in shapes.items()}
    return OutlierCue("m", "f", names, mu, sigma, {n: 1.0 for n in names}, {n: 1.0 for n in names}), taps


@needs_cc
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("work", [(53, 70), (12, 9), (40, 40)])
def test_mean_abs_matches_the_reference(threads, work):
    cue, taps = _cue({"a": (2, 32, 90, 120), "b": (2, 5, 7, 11), "c": (2, 3, 40, 40)})
    spr = SPRConfig(work, ((3, 3),), ((3, 3),))
    got = C.CpuMeanAbsZ(cue.stats(), work, threads=threads).mean_abs(taps)
    ref = cue.mean_abs(taps, spr)
    for n in cue.layers:
        assert got[n].shape == ref[n].shape == (2, 1, *work)
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5)
    # non-contiguous taps and the pooled maps
    odd = {n: t.transpose(2, 3).contiguous().transpose(2, 3) for n, t in taps.items()}
    torch.testing.assert_close(cue.maps(odd, spr, C.CpuMeanAbsZ(cue.stats(), work).mean_abs(odd)), cue.maps(taps, spr),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return build_model("ddrnet23_slim").eval()


def _frames():
    """Two frames of the bundled demo clip; the second with the library EOT L patch pasted on."""
    import av
    import numpy as np
    from PIL import Image
    clip = REPO / "realtime" / "live" / "sources" / "assets" / "demo_0016E5" / "frames.mp4"
    with av.open(str(clip)) as f:
        imgs = [fr.to_ndarray(format="rgb24") for _, fr in zip(range(2), f.decode(video=0))]
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1) for i in imgs]).float() / 255
    x = torch.nn.functional.interpolate(x, size=(360, 480), mode="bilinear", align_corners=False)
    patch = np.asarray(Image.open(REPO / "realtime" / "attacks" / "library" / "ddrnet23_slim_eot_L.png").convert("RGB"))
    p = torch.from_numpy(patch.copy()).permute(2, 0, 1).float() / 255
    x[1, :, 146:146 + p.shape[1], 169:169 + p.shape[2]] = p
    return x


@needs_cc
def test_zmask_cue_on_the_kernel_equals_the_reference(model):
    ctx = DefenseContext(model, "ddrnet23_slim", calibration=CAL)
    ref = build_defense("zmask_cue", ctx)
    fast = build_defense("zmask_cue", ctx, heatmap_backend=heatmap_backend("auto"))
    x = _frames()
    with torch.inference_mode():
        a, b = ref(x), fast(x)
        cue_ref = ref.zm.cue.score(ref.zm.cue_maps(ref.zm.taps(x)[1]))
        cue_fast = fast.zm.cue.score(fast.zm.cue_maps(fast.zm.taps(x)[1]))
    torch.testing.assert_close(b.score, a.score, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cue_fast, cue_ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(a.flagged, b.flagged) and torch.equal(a.mask, b.mask)
    assert a.flagged.tolist() == [False, True] and float(cue_ref[1]) > 1.0    # the cue itself flags the 'patch'
    assert fast.describe()["heatmaps"] == "cpu kernel" and ref.describe()["heatmaps"] == "reference"
    router = fast.zm._fused
    assert [v for _, _, v in router._mean_abs.values()] == [True]       # the cue went through the kernel, checked once
    assert x.equal(_frames())


@needs_cc
def test_cue_under_autograd_stays_on_the_differentiable_reference(model):
    ctx = DefenseContext(model, "ddrnet23_slim", calibration=CAL)
    fast = build_defense("zmask_cue", ctx, heatmap_backend=heatmap_backend("auto"))
    x = _frames().requires_grad_(True)
    _, taps = fast.zm.taps(x)
    maps = fast.zm.cue_maps(taps)
    fast.zm.cue.score(maps).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not fast.zm._fused._mean_abs                                 # never asked the kernel



def test_live_zmask_cue_gets_the_kernels_option():
    """``realtime.run --defense zmask_cue --kernels auto`` attaches the backend (it used to run the reference)."""
    from realtime import run as cli
    from realtime.live.build import build
    from realtime.live.pipeline import PipelineConfig
    from realtime.live.voting import VotingConfig
    args = cli.parse_args(["--source", "demo", "--defense", "zmask_cue", "--kernels", "auto", "--output", "none"])
    rt = build(cli.config_from_args(args), torch.device("cpu"), PipelineConfig(imgsz=None, voting=VotingConfig.parse("3/5")))
    zm = rt.step.defense.zm
    assert rt.description["kernels"] == "auto" and zm._fused is not None
    with torch.inference_mode():
        rt.step.defense(_frames()[:1])
    assert zm.heatmaps_in_use() == ("cpu kernel" if C.cpu_available()[0] else "reference")


def test_zmask_cue_reads_an_engine_that_exports_its_layers(model, tmp_path):
    """An onnxruntime engine exporting Z-Mask's and the cue's layers runs zmask_cue's first pass (no module hooks),
    with the same flags and scores as the hooked module; an engine without the cue's layers falls back to hooks."""
    pytest.importorskip("onnxruntime")
    from engines import EngineConfig, build_engine
    from realtime.defenses.artifact import load_calibration
    from realtime.defenses.cue import cue_layers
    cal = load_calibration(CAL, model)
    layers = (*cal.config.layers, *cue_layers("ddrnet23_slim"))
    assert cue_layers("ddrnet23_slim") == ("conv1", "layer1")
    eng = build_engine(model, layers, EngineConfig(backend="onnxruntime", input_shape=(360, 480),
                                                   cache_dir=str(tmp_path), threads=1))
    hooked = build_defense("zmask_cue", DefenseContext(model, "ddrnet23_slim", calibration=CAL))
    on_engine = build_defense("zmask_cue", DefenseContext(model, "ddrnet23_slim", engine=eng, calibration=CAL))
    assert on_engine.zm.taps is eng and hooked.zm.taps is not eng
    x = _frames()
    with torch.inference_mode():
        a, b = hooked(x), on_engine(x)
    assert torch.equal(a.flagged, b.flagged) and a.flagged.tolist() == [False, True]
    torch.testing.assert_close(b.score, a.score, rtol=1e-3, atol=1e-5)
    short = build_engine(model, cal.config.layers, EngineConfig(backend="onnxruntime", input_shape=(360, 480),
                                                                cache_dir=str(tmp_path), threads=1))
    assert build_defense("zmask_cue", DefenseContext(model, "ddrnet23_slim", engine=short,
                                                     calibration=CAL)).zm.taps is not short


def test_live_zmask_cue_on_onnxruntime_runs_its_first_pass_in_the_engine(monkeypatch, tmp_path):
    """``realtime.run --engine onnxruntime --defense zmask_cue``: the engine exports Z-Mask's and the cue's layers
    and the defense reads them (it used to hook the torch module and run the backbone there)."""
    pytest.importorskip("onnxruntime")
    from realtime import run as cli
    from realtime.live.build import build
    from realtime.live.pipeline import PipelineConfig
    from realtime.live.voting import VotingConfig
    monkeypatch.setenv("REALTIME_ENGINE_CACHE", str(tmp_path))
    args = cli.parse_args(["--source", "demo", "--defense", "zmask_cue", "--engine", "onnxruntime", "--output", "none"])
    rt = build(cli.config_from_args(args), torch.device("cpu"), PipelineConfig(imgsz=None, voting=VotingConfig.parse("3/5")))
    zm = rt.step.defense.zm
    assert set(rt.description["engine"]["layers"]) == {"layer2", "layer3", "layer4_", "conv1", "layer1"}
    assert type(zm.taps).__name__ != "ActivationTaps" and zm.taps.layers == tuple(rt.description["engine"]["layers"])
    with torch.inference_mode():
        res = rt.step.defense(_frames())
    assert res.flagged.tolist() == [False, True]
