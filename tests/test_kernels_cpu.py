"""The Z-Mask CPU kernel (kernels/cpu.py + zmask_cpu.c) against the plain-torch reference terms.

Skipped (saying why) where no C compiler exists; the fallback without one is tested with a stand-in."""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import pytest
import torch

from kernels import cpu as C
from realtime.defenses import ChannelStats, FusionBlock, SPRConfig, ZMask, ZMaskConfig
from realtime.core.taps import EngineTaps

needs_cc = pytest.mark.skipif(not C.cpu_available()[0], reason=f"CPU kernel unavailable: {C.cpu_available()[1]}")


def _setup(shapes: Dict[str, Tuple[int, int, int, int]], work: Tuple[int, int], shallow_k, deep_k,
           seed: int = 0, mode: str = "same") -> Tuple[ZMask, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    taps = {k: torch.randn(*s, generator=g) * 2 + 0.5 for k, s in shapes.items()}
    names = tuple(shapes)
    cfg = ZMaskConfig(names[:-1] or names, names[-1:], SPRConfig(work, shallow_k, deep_k, mode=mode), lambda0=0.01)
    stats = ChannelStats({k: torch.randn(v.shape[1], generator=g) for k, v in taps.items()},
                         {k: torch.rand(v.shape[1], generator=g) + 0.2 for k, v in taps.items()})
    return ZMask(EngineTaps(lambda x: (x, {}), cfg.layers), cfg, stats, FusionBlock()), taps


CASES = {
    "up+down": (dict(a=(1, 5, 20, 26), b=(1, 7, 6, 9)), (12, 16), ((5, 6), (3, 3), (1, 1)), ((5, 5),)),
    "equal size, batch 3": (dict(a=(3, 4, 10, 14), b=(3, 3, 10, 14)), (10, 14), ((2, 4), (1, 3)), ((3, 2),)),
    "kernel wider than the map": (dict(a=(2, 6, 9, 7), b=(2, 5, 4, 5)), (9, 11), ((17, 21), (9, 11)), ((13, 3),)),
    "odd work size": (dict(a=(1, 8, 31, 17), b=(1, 9, 13, 23), c=(1, 3, 5, 5)), (23, 19),
                      ((7, 7), (4, 6)), ((9, 9), (2, 2))),
}


@needs_cc
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_terms_match_the_reference(case: str, threads: int) -> None:
    shapes, work, ks, kd = CASES[case]
    zm, taps = _setup(shapes, work, ks, kd)
    ref = zm.reference_terms(taps)
    got = C.CpuZMask(zm.cfg, zm.stats, threads=threads).terms(taps)
    assert set(got) == set(ref)
    for key, r in ref.items():
        assert got[key].shape == r.shape and got[key].dtype == torch.float32
        err = ((got[key] - r).abs().max() / r.abs().max()).item()
        assert err < 2e-5, (key, err)


@needs_cc
def test_threads_agree_bit_for_bit_on_repeat_and_inputs_untouched() -> None:
    shapes, work, ks, kd = CASES["odd work size"]
    zm, taps = _setup(shapes, work, ks, kd, seed=3)
    before = {k: v.clone() for k, v in taps.items()}
    eng = C.CpuZMask(zm.cfg, zm.stats, threads=2)
    a, b = eng.terms(taps), eng.terms(taps)
    assert all(torch.equal(a[k], b[k]) for k in a)          # fixed thread shares, fixed summation order
    assert all(torch.equal(before[k], taps[k]) for k in taps)


@needs_cc
def test_non_contiguous_and_half_taps_are_read_as_float32() -> None:
    shapes, work, ks, kd = CASES["up+down"]
    zm, taps = _setup(shapes, work, ks, kd, seed=5)
    nc = {k: v.transpose(2, 3).contiguous().transpose(2, 3) for k, v in taps.items()}
    assert not nc["a"].is_contiguous()
    ref = zm.reference_terms(taps)
    got = C.CpuZMask(zm.cfg, zm.stats, threads=1).terms(nc)
    assert all(torch.allclose(got[k], ref[k], rtol=2e-5, atol=1e-7) for k in ref)


@needs_cc
def test_bad_taps_fail_clearly() -> None:
    shapes, work, ks, kd = CASES["up+down"]
    zm, taps = _setup(shapes, work, ks, kd)
    eng = C.CpuZMask(zm.cfg, zm.stats)
    with pytest.raises(ValueError, match="channels but statistics have"):
        eng.terms({**taps, "a": taps["a"][:, :2]})
    with pytest.raises(ValueError, match=r"\(N,C,H,W\)"):
        eng.terms({**taps, "a": taps["a"][0]})


def test_demo_mode_is_refused() -> None:
    shapes, work, ks, kd = CASES["up+down"]
    zm, _ = _setup(shapes, work, ks, kd, mode="demo")
    with pytest.raises(C.CpuKernelUnavailable, match="'same' only"):
        C.CpuZMask(zm.cfg, zm.stats)


def test_linear_indices_follow_torch_bilinear() -> None:
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in [(5, 12), (20, 7), (9, 9), (53, 70), (1, 4)]:
        x = torch.randn(1, 1, 1, n_in, generator=g)
        want = torch.nn.functional.interpolate(x, size=(1, n_out), mode="bilinear", align_corners=False)[0, 0, 0]
        i0, i1, lam = C.linear_indices(n_in, n_out)
        v = x[0, 0, 0]
        got = v[torch.from_numpy(i0).long()] * (1 - torch.from_numpy(lam)) + v[torch.from_numpy(i1).long()] * \
            torch.from_numpy(lam)
        # torch's CPU bilinear kernel derives its weights along another float path: ~1e-5 apart at 53->70
        # over many draws, the same 2e-5 the terms are held to.
        assert torch.allclose(got, want, atol=2e-5), (n_in, n_out)


def test_no_compiler_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(C, "_LIB", {})
    monkeypatch.setattr(C, "_compiler", lambda: None)
    ok, why = C.cpu_available()
    assert ok is False and "no C compiler" in why
    with pytest.raises(C.CpuKernelUnavailable, match="no C compiler"):
        C.load()


@needs_cc
def test_broken_compiler_is_reported_and_cache_is_per_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake-cc 1.0 && exit 0\necho 'fake: broken' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ZMASK_CPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "_LIB", {})
    monkeypatch.setattr(C, "_compiler", lambda: str(fake))
    ok, why = C.cpu_available()
    assert ok is False and "fake: broken" in why
    assert not list((tmp_path / "cache").glob("*.so"))     # nothing half-written left in the cache


def _trained_fusion(seed: int) -> FusionBlock:
    """A fusion block with non-default parameters, so every one of the 8 scalars matters."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(8, generator=g).tolist()
    from realtime.defenses import PARAM_NAMES
    return FusionBlock(**{n: v for n, v in zip(PARAM_NAMES, vals)})


@needs_cc
@pytest.mark.parametrize("case", sorted(CASES))
def test_tail_matches_the_reference_cascades_and_fusion(case: str) -> None:
    shapes, work, ks, kd = CASES[case]
    zm, taps = _setup(shapes, work, ks, kd, seed=7)
    fusion = _trained_fusion(1)
    h_s, h_d, soft, score = C.CpuZMask(zm.cfg, zm.stats, threads=2).detect(taps, fusion)
    r_s, r_d = zm.reference_heatmaps(taps)
    r_soft, r_score = fusion(r_s, r_d)
    n = next(iter(taps.values())).shape[0]
    assert h_s.shape == r_s.shape and soft.shape == r_soft.shape and score.shape == (n,)
    for got, want in ((h_s, r_s), (h_d, r_d), (soft, r_soft), (score, r_score)):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, (case, err)


@needs_cc
def test_router_runs_the_whole_first_pass_in_c_and_flags_like_the_reference() -> None:
    from kernels import heatmap_backend
    shapes, work, ks, kd = CASES["equal size, batch 3"]
    zm, taps = _setup(shapes, work, ks, kd, seed=11)
    zm.fusion = _trained_fusion(2)
    auto = ZMask(zm.taps, zm.cfg, zm.stats, zm.fusion, heatmap_backend=heatmap_backend("auto"))
    with torch.no_grad():
        ref = zm.detect(taps, (40, 56))
        # a threshold between the frames' scores, so both verdicts occur
        s = ref.score.sort().values
        for z in (zm, auto):
            z.cfg = dataclasses.replace(zm.cfg, lambda0=float((s[0] + s[1]) / 2))
        ref, got = zm.detect(taps, (40, 56)), auto.detect(taps, (40, 56))
    assert auto._fused.cpu_tail_verdict is True and auto.heatmaps_in_use() == "cpu kernel"
    assert torch.equal(got.flagged, ref.flagged) and got.flagged.any() and not got.flagged.all()
    assert torch.allclose(got.score, ref.score, rtol=1e-5) and got.mask.shape == ref.mask.shape
    assert (got.mask != ref.mask).float().mean() < 0.01           # threshold ties on a few border pixels at most
    # with gradients wanted on the fusion block, the tail steps aside (the torch block is differentiable)
    auto.fusion.requires_grad_(True)
    det = auto.detect(taps, (40, 56))
    assert det.score.requires_grad
