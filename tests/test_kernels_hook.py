"""ZMask(heatmap_backend=...): selection logic of kernels/backend.py, on CPU.

Where the decision needs a GPU, the kernels' availability, eligibility and engine are replaced by
stand-ins (the real kernels are exercised in tests/test_kernels_gpu.py)."""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import pytest

from kernels.backend import heatmap_backend
import torch

import kernels
from kernels import backend as B
from realtime.defenses import ChannelStats, Detection, FusionBlock, SPRConfig, ZMask, ZMaskConfig
from realtime.core.taps import EngineTaps


def _zm(backend: str = "reference") -> Tuple[ZMask, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    taps = {"a": torch.rand(2, 4, 12, 16, generator=g), "b": torch.rand(2, 6, 6, 8, generator=g)}
    cfg = ZMaskConfig(("a", "b"), ("b",), SPRConfig((9, 12), ((5, 6), (2, 2)), ((5, 6),)), lambda0=0.01)
    stats = ChannelStats({k: torch.rand(v.shape[1], generator=g) for k, v in taps.items()},
                         {k: torch.rand(v.shape[1], generator=g) + 0.5 for k, v in taps.items()})
    return ZMask(EngineTaps(lambda x: (x, {}), cfg.layers), cfg, stats, FusionBlock(), heatmap_backend=heatmap_backend(backend)), taps


def test_default_is_reference_and_names_are_checked() -> None:
    zm, taps = _zm()
    assert zm.heatmap_backend == "reference" and zm._fused is None
    with pytest.raises(ValueError, match="heatmap_backend"):
        _zm("cuda")


def test_auto_on_cpu_taps_without_the_cpu_kernel_is_the_reference_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "cpu_available", lambda: (False, "no C compiler (stand-in)"))
    ref, taps = _zm()
    auto, _ = _zm("auto")
    monkeypatch.setattr(auto._fused, "terms", lambda t: pytest.fail("the CPU kernel must not run"))
    monkeypatch.setattr(auto._fused, "cpu_eligible", lambda t: (False, "stand-in: kernel unavailable"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        da, db = auto.detect(taps, (18, 24)), ref.detect(taps, (18, 24))
    assert all(torch.equal(x, y) for x, y in zip(da, db))
    assert auto._fused.eligible(taps, False) == (False, "taps are not on a CUDA device")


@pytest.mark.skipif(not B.cpu_available()[0], reason="no C compiler here: the CPU kernel cannot be built")
def test_auto_on_cpu_taps_uses_the_cpu_kernel_after_its_self_check() -> None:
    ref, taps = _zm()
    auto, _ = _zm("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = auto.heatmaps(taps), ref.heatmaps(taps)
        da, db = auto.detect(taps, (18, 24)), ref.detect(taps, (18, 24))
    assert auto._fused.cpu_verdict is True
    assert B.rel_err(a[0], b[0]) < 1e-5 and B.rel_err(a[1], b[1]) < 1e-5
    assert torch.allclose(da.score, db.score, rtol=1e-5, atol=1e-7) and torch.equal(da.flagged, db.flagged)
    with torch.enable_grad():                                  # grad-requiring taps stay on the reference
        gt = {k: v.clone().requires_grad_(True) for k, v in taps.items()}
        assert auto._fused.cpu_eligible(gt)[0] is False
        assert torch.equal(auto.heatmaps(gt)[0].detach(), ref.heatmaps(gt)[0].detach())


@pytest.mark.skipif(kernels.available()[0], reason="the kernels are available here")
def test_fused_without_cuda_or_compiler_fails_clearly_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "cpu_available", lambda: (False, "no C compiler (stand-in)"))
    with pytest.raises(kernels.KernelsUnavailable, match="heatmap_backend='fused'.*(CUDA|cupy).*no C compiler"):
        _zm("fused")


def test_fused_refuses_cpu_taps_without_cpu_kernel_and_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "available", lambda: (True, "stand-in"))
    monkeypatch.setattr(B, "cpu_available", lambda: (False, "no C compiler (stand-in)"))
    zm, taps = _zm("fused")
    with pytest.raises(RuntimeError, match="not on a CUDA device and no C compiler"):
        zm.heatmaps(taps)
    router = zm._fused
    monkeypatch.setattr(router, "on_cpu", lambda t: False)
    monkeypatch.setattr(router, "eligible", lambda t, with_fusion: (False, "fusion parameters require grad")
                        if with_fusion else (True, ""))
    assert router.use(taps, with_fusion=True) is False      # detect: fused heatmaps + torch fusion block
    assert router.use(taps, with_fusion=False) is True


class _StandIn:
    """An engine that returns the reference's own numbers, optionally perturbed or failing."""

    def __init__(self, zm: ZMask, scale: float = 1.0, fail: bool = False) -> None:
        self.zm, self.scale, self.fail, self.calls = zm, scale, fail, 0

    def detect(self, taps, size, fusion, lambda0, thr) -> Detection:
        self.calls += 1
        if self.fail:
            raise RuntimeError("launch failed")
        h_s, h_d = self.zm.reference_heatmaps(taps)
        h_s = h_s * self.scale
        soft, score = fusion(h_s, h_d)
        flagged = score > lambda0
        return Detection(h_s, h_d, soft, score, flagged, self.zm.input_mask(soft, flagged, size))

    def heatmaps(self, taps):
        self.calls += 1
        h_s, h_d = self.zm.reference_heatmaps(taps)
        return h_s * self.scale, h_d


def _auto_with(monkeypatch: pytest.MonkeyPatch, **kw) -> Tuple[ZMask, Dict[str, torch.Tensor], _StandIn]:
    monkeypatch.setattr(B, "available", lambda: (True, "stand-in"))
    zm, taps = _zm("auto")
    eng = _StandIn(zm, **kw)
    monkeypatch.setattr(zm._fused, "on_cpu", lambda t: False)           # route these CPU taps as if on CUDA
    monkeypatch.setattr(zm._fused, "eligible", lambda t, with_fusion: (True, ""))
    monkeypatch.setattr(zm._fused, "engine", lambda: eng)
    return zm, taps, eng


def test_auto_self_check_pass_switches_to_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    zm, taps, eng = _auto_with(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zm.detect(taps, (9, 12))
        zm.detect(taps, (9, 12))
    assert list(zm._fused.verdicts.values()) == [True]
    assert eng.calls == 3                                      # one self-check + two fused detects


@pytest.mark.parametrize("kw, match", [(dict(scale=1.01), "disagree"), (dict(fail=True), "failed")])
def test_auto_self_check_failure_warns_once_and_stays_reference(monkeypatch: pytest.MonkeyPatch, kw: dict,
                                                                  match: str) -> None:
    zm, taps, eng = _auto_with(monkeypatch, **kw)
    with pytest.warns(RuntimeWarning, match=match):
        out = zm.heatmaps(taps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no second warning
        again = zm.heatmaps(taps)
    ref = zm.reference_heatmaps(taps)
    assert torch.equal(out[0], ref[0]) and torch.equal(again[0], ref[0])
    assert list(zm._fused.verdicts.values()) == [False] and eng.calls == 1


def test_rel_err() -> None:
    b = torch.tensor([1.0, -4.0])
    assert B.rel_err(b + torch.tensor([0.0, 0.004]), b) == pytest.approx(1e-3, rel=1e-4)
    assert B.rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
