"""The defended model as one ONNX graph: parity with the plain-torch Z-Mask reference under onnxruntime.

Reference: ``ZMask`` (``reference_heatmaps`` + ``FusionBlock`` + ``input_mask``) on the eager module.
Measured (2-core CPU): max |d_onnx - d_ref| 1.5e-8 (96x128) and 7.5e-9 (360x480) on random batches;
CamVid val frames with and without the model's EOT patch at 360x480: flags identical, diff asserted <= 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines import EngineConfig, build_engine
from engines.defended_export import export_defended, export_plain
from engines.defended_graph import LABEL_OUTPUTS
from kernels import heatmap_backend
from kernels.cpu import cpu_available
from realtime.defenses.artifact import load_calibration
from realtime.defenses.registry import DefenseContext, build_defense
from realtime.models import build_model, fingerprint

REPO = Path(__file__).resolve().parents[1]
SCORE_TOL = 1e-4
# Standard ops the graph may use: all parsed by TensorRT's ONNX parser and run by onnxruntime's CPU EP.
STANDARD_OPS = {"Conv", "Relu", "Add", "Mul", "Sub", "Div", "AveragePool", "GlobalAveragePool", "MaxPool",
                "Concat", "Shape", "Unsqueeze", "Cast", "Slice", "Resize", "BatchNormalization", "ReduceL1",
                "ReduceMax", "ReduceSum", "ReduceMean", "Gather", "Reciprocal", "Max", "Identity", "Tanh", "Sigmoid",
                "Greater", "Reshape", "And", "Not", "ArgMax", "Constant", "Pad", "Squeeze", "Sqrt", "Pow",
                "Flatten", "Gemm", "MatMul", "Transpose", "ConstantOfShape", "Where", "Equal", "Expand"}


def _sessions(model, cal, hw, cache):
    cfg = EngineConfig(backend="onnxruntime", input_shape=hw, cache_dir=str(cache), threads=1)
    fp = fingerprint(model)
    d = export_defended(model, cal, cfg, fp, model.model_name if hasattr(model, "model_name") else "m")
    p = export_plain(model, cfg, fp, "m")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    mk = lambda f: ort.InferenceSession(str(f.path), opts, providers=["CPUExecutionProvider"])  # noqa: E731
    return d, mk(d), mk(p)


def _compare(zm, sess, plain, x):
    with torch.inference_mode():
        ref = zm(x)
    labels, score, flag, keep = sess.run(list(LABEL_OUTPUTS), {"input": x.numpy()})
    diff = float(np.abs(score - ref.score.numpy()).max())
    assert diff <= SCORE_TOL, diff
    assert np.array_equal(flag, ref.flagged.numpy())
    want_keep = ref.mask.numpy().astype(np.uint8)
    assert keep.dtype == np.uint8 and keep.shape == want_keep.shape
    assert (keep != want_keep).mean() <= 1e-4            # pixels exactly at the threshold may flip
    first = ref.output.argmax(1).numpy()
    assert labels.dtype == np.uint8 and (labels == first).mean() >= 0.9999
    # second pass: the plain graph on the shielded input of the flagged frames
    if ref.flagged.any():
        idx = ref.flagged.nonzero().flatten()
        xd = ref.defended_input[idx].numpy()
        second = plain.run(None, {"input": xd})[0]
        assert (second == ref.defended_output[idx].argmax(1).numpy()).mean() >= 0.9999
    return diff


@pytest.fixture(scope="module")
def ddrnet():
    m = build_model("ddrnet23_slim")
    return m, load_calibration(REPO / "calibration/shipped/ddrnet23_slim.safetensors", m)


def test_random_batches_dynamic_batch_and_standard_ops(ddrnet, tmp_path):
    model, cal = ddrnet
    hw = (96, 128)
    graph, sess, plain = _sessions(model, cal, hw, tmp_path)
    ops = {n.op_type for n in onnx.load(str(graph.path)).graph.node}
    assert ops <= STANDARD_OPS, ops - STANDARD_OPS
    zm = cal.build_zmask(model)
    g = torch.Generator().manual_seed(0)
    for n in (1, 3):
        x = torch.rand(n, 3, *hw, generator=g)
        x[-1, :, 30:80, 20:100] = torch.rand(3, 50, 80, generator=g) ** 4      # a loud square
        _compare(zm, sess, plain, x)
    # a low lambda0 flags everything: the mask path on every frame
    zm.cfg = type(zm.cfg)(**{**zm.cfg.__dict__, "lambda0": -1.0})
    cal_low = type(cal)(**{**cal.__dict__, "config": zm.cfg})
    _, sess_low, _ = _sessions(model, cal_low, hw, tmp_path)
    x = torch.rand(2, 3, *hw, generator=g)
    _compare(zm, sess_low, plain, x)


def test_mask_growing_in_the_graph_matches_the_reference(ddrnet, tmp_path):
    """A growing calibration: the graph's unrolled growth gives the reference's keep-mask (flag on every frame)."""
    import dataclasses
    model, cal = ddrnet
    hw = (96, 128)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, *hw, generator=g)
    x[:, :, 20:70, 30:110] = torch.rand(2, 3, 50, 80, generator=g) ** 4
    probe = cal.build_zmask(model)
    with torch.inference_mode():
        h_s, h_d, fine = probe.reference_maps(probe.taps(x)[1])
        soft = probe.fusion(h_s, h_d)[0]
    probe.taps.remove()
    cfg = dataclasses.replace(cal.config, lambda0=-1.0, mask_threshold=0.9 * float(soft.amax((1, 2, 3)).min()),
                              grow_threshold=float(fine.median()), grow_steps=12)
    cal_g = dataclasses.replace(cal, config=cfg)
    _, sess, plain = _sessions(model, cal_g, hw, tmp_path)
    zm = cal_g.build_zmask(model)
    _compare(zm, sess, plain, x)
    with torch.inference_mode():
        grown = (zm(x).mask < 0.5).sum()
        zm.cfg = dataclasses.replace(cfg, grow_threshold=None)
        plain_masked = (zm(x).mask < 0.5).sum()
    assert int(grown) > int(plain_masked)          # growing did add masked pixels here


def test_zmask_on_onnxruntime_runs_the_defended_graph(ddrnet, tmp_path):
    model, cal = ddrnet
    hw = (96, 128)
    eng = build_engine(model, cal.config.layers, EngineConfig(backend="onnxruntime", input_shape=hw,
                                                              cache_dir=str(tmp_path), threads=1))
    d = build_defense("zmask", DefenseContext(model, "ddrnet23_slim", engine=eng, loaded_calibration=cal))
    assert d.zm.heatmap_backend == "onnxruntime-graph"
    ref = cal.build_zmask(model)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = d(x), ref(x)
    assert float((got.score - want.score).abs().max()) <= SCORE_TOL
    assert torch.equal(got.flagged, want.flagged)
    # a threshold override recomputes flag and mask from d and M~ (the graph bakes lambda0 in)
    d.zm.cfg = type(d.zm.cfg)(**{**d.zm.cfg.__dict__, "lambda0": -1.0})
    ref.cfg = d.zm.cfg
    with torch.inference_mode():
        got, want = d(x), ref(x)
    assert bool(got.flagged.all()) and torch.equal(got.flagged, want.flagged)
    assert float((got.mask != want.mask).float().mean()) <= 1e-4
    torch.testing.assert_close(got.output, want.defended_output, atol=1e-3, rtol=1e-3)


class _NoCpuKernel:
    """A heatmap-backend factory that reports no CPU kernel (what a machine without a C compiler sees)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, zmask):
        return self.inner(zmask)

    def cpu_kernel_ready(self) -> bool:
        return False


@pytest.mark.skipif(not cpu_available()[0], reason="the Z-Mask CPU kernel cannot be built here (no C compiler)")
def test_cpu_kernel_is_preferred_to_the_defended_graph(ddrnet, tmp_path):
    """On CPU with the C kernel ready, the engine's plain tapped graph feeds the kernel (faster than the graph's
    own heatmaps); without it the defended graph is used. Both give the reference's decisions."""
    model, cal = ddrnet
    hw = (96, 128)
    eng = build_engine(model, cal.config.layers, EngineConfig(backend="onnxruntime", input_shape=hw,
                                                              cache_dir=str(tmp_path), threads=1))
    ctx = lambda: DefenseContext(model, "ddrnet23_slim", engine=eng, loaded_calibration=cal)  # noqa: E731
    fast = build_defense("zmask", ctx(), heatmap_backend=heatmap_backend("auto"))
    graph = build_defense("zmask", ctx(), heatmap_backend=_NoCpuKernel(heatmap_backend("auto")))
    assert fast.zm.heatmap_backend == "auto" and graph.zm.heatmap_backend == "onnxruntime-graph"
    ref = cal.build_zmask(model)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(x)
        for d in (fast, graph):
            got = d(x)
            assert float((got.score - want.score).abs().max()) <= SCORE_TOL
            assert torch.equal(got.flagged, want.flagged)
    assert fast.describe()["heatmaps"] == "cpu kernel"


@pytest.mark.parametrize("name", ["ddrnet23_slim", "bisenetv1"])
def test_robustness_frames_flags_identical(name, camvid_root, tmp_path):
    from benchmarks.latency_frames import build_frames
    model = build_model(name)
    cal = load_calibration(REPO / f"calibration/shipped/{name}.safetensors", model)
    hw = tuple(cal.input_size)
    fs = build_frames(name, 3, hw, str(camvid_root))
    frames = np.stack(fs.clean + fs.attacked)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    _, sess, plain = _sessions(model, cal, hw, tmp_path)
    zm = cal.build_zmask(model)
    diff = _compare(zm, sess, plain, x)
    with torch.inference_mode():
        flagged = zm(x).flagged
    assert bool(flagged[3:].any()), "the patched frames should be flagged"
    assert diff <= SCORE_TOL
