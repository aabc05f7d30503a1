"""Z-Mask: taps, fusion block, the detector/masker on toy models and on the shipped DDRNet with CamVid."""
from __future__ import annotations

import dataclasses
import math
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from realtime.defenses import (ActivationTaps, ChannelStats, EngineTaps, FusionBlock, SPRConfig, ZMask,
                               ZMaskConfig, fit_channel_stats, to_work, zscore)


class Toy(nn.Module):
    """conv -> relu -> conv -> 1x1 head; records the batch size of every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.body = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Conv2d(6, 2, 1)
        self.register_buffer("mean_color", torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1))
        self.batches: List[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.head(self.body(self.act(self.stem(x))))


def _toy_zmask(lambda0: float = 0.0) -> ZMask:
    model = Toy()
    cfg = ZMaskConfig(shallow=("stem", "body"), deep=("body",), spr=SPRConfig((8, 8), ((3, 3), (1, 1)), ((3, 3),)),
                      lambda0=lambda0)
    with torch.no_grad(), ActivationTaps(model, cfg.layers) as taps:
        _, maps = taps(_clean(4, seed=1))                       # statistics from "clean" toy frames
    model.batches.clear()
    return ZMask(model, cfg, fit_channel_stats([maps], cfg.spr))


def _clean(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.2 + 0.4


# --------------------------------------------------------------------------- taps

def test_taps_one_forward_hooks_registered_once() -> None:
    model = Toy()
    taps = ActivationTaps(model, ["stem", "body", "stem"])
    assert taps.layers == ("stem", "body")
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    for _ in range(3):
        out, maps = taps(x)
    assert len(model.stem._forward_hooks) == 1 and len(model.body._forward_hooks) == 1
    assert model.batches == [2, 2, 2]                          # one forward per call
    assert taps.calls == {"stem": 1, "body": 1}
    assert maps["body"].shape == (2, 6, 8, 8) and out.shape == (2, 2, 8, 8)
    assert maps["stem"].requires_grad                           # not detached: attacks need gradients
    grad, = torch.autograd.grad(maps["body"].sum(), x)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        _, maps = taps(x)
    assert not maps["stem"].requires_grad
    taps.plain(x)                                               # records nothing, hooks idle
    assert taps.calls == {"stem": 1, "body": 1}
    taps.remove()
    assert len(model.stem._forward_hooks) == 0


def test_taps_errors_and_rules() -> None:
    model = Toy()
    with pytest.raises(KeyError, match="close: \\['body'\\]"):
        ActivationTaps(model, ["bdy"])

    class Inplace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(x))

    with torch.no_grad():
        with ActivationTaps(Inplace(), ["conv"]) as taps, pytest.raises(RuntimeError, match="in place"):
            taps(torch.randn(1, 3, 4, 4))
        with ActivationTaps(Inplace(), ["conv"], clone=True) as taps:
            out, maps = taps(torch.randn(1, 3, 4, 4))
            assert (maps["conv"] < 0).any() and (out >= 0).all()

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x: torch.Tensor):
            return self.inner((x * 2, x * 3))

    x = torch.ones(1, 3, 2, 2)
    _, maps = ActivationTaps(TupleOut(), ["inner"])(x)
    assert torch.equal(maps["inner"], x * 2)                    # first tensor of a tuple output


def test_engine_taps_drive_zmask() -> None:
    ref = _toy_zmask()
    x = _clean(2)
    with torch.no_grad():
        want = ref.analyse(x)
        engine = EngineTaps(lambda t: ref.taps(t), layers=("stem", "body"), mean_color=ref.mean_color)
        got = ZMask(engine, ref.cfg, ref.stats, ref.fusion).analyse(x)
    assert torch.allclose(got.h_s, want.h_s) and torch.allclose(got.score, want.score)
    with pytest.raises(KeyError, match="did not return"):
        EngineTaps(lambda t: (t, {}), layers=("stem",))(x)


# --------------------------------------------------------------------------- fusion

def test_fusion_has_eight_scalars_and_hand_formula() -> None:
    block = FusionBlock(w1=1.0, b1=0.0, w2=1.0, b2=0.0, w3=1.0, b3=0.0, w4=1.0, b4=0.0)
    params = list(block.parameters())
    assert len(params) == 8 and all(p.numel() == 1 for p in params)
    soft, d = block(torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0))
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))                 # noqa: E731
    g = sig(math.tanh(1.0))
    m = sig(math.tanh(2.0 * g))
    assert soft.item() == pytest.approx(m, rel=1e-6)
    assert d.item() == pytest.approx(2.0 * 1.0 * m / (1.0 + m), rel=1e-6)
    again = FusionBlock.from_dict(block.to_dict())
    assert again.to_dict() == block.to_dict()
    with pytest.raises(KeyError):
        FusionBlock.from_dict({"w1": 1.0})


def test_default_fusion_scores_hot_spot_and_masks_only_it() -> None:
    block = FusionBlock()
    clean = torch.full((1, 1, 20, 20), 0.1)
    hot = clean.clone()
    hot[..., 5:10, 5:10] = 3.0
    soft_c, d_c = block(clean, clean)
    soft_h, d_h = block(hot, hot)
    assert d_h.item() > 10 * d_c.item()
    assert (soft_c < 0.5).all()                                 # untrained block masks nothing clean
    assert (soft_h[..., 5:10, 5:10] > 0.5).all() and (soft_h[..., 12:, :] < 0.5).all()


# --------------------------------------------------------------------------- ZMask on a toy model

def test_zmask_validation_errors() -> None:
    zm = _toy_zmask()
    with pytest.raises(ValueError, match="NaN"):
        zm(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="N,3,H,W"):
        zm(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="N,3,H,W"):
        zm(torch.rand(1, 4, 16, 16))
    bad = ChannelStats({"stem": torch.zeros(4)}, {"stem": torch.ones(4)})
    with pytest.raises(KeyError, match="body"):
        ZMask(Toy(), zm.cfg, bad)
    wrong = ChannelStats({"stem": torch.zeros(5), "body": torch.zeros(6)},
                         {"stem": torch.ones(5), "body": torch.ones(6)})
    with pytest.raises(ValueError, match="channels"):
        ZMask(Toy(), zm.cfg, wrong)(torch.rand(1, 3, 16, 16))


def test_second_pass_only_on_flagged_frames_and_mean_colour_fill() -> None:
    zm = _toy_zmask()
    x = _clean(2)
    x[1, :, 4:10, 4:10] = 1.0                                   # a saturated block on frame 1
    x[1, 0, 4:10, 4:10] = 0.0
    with torch.no_grad():
        zm.fusion.b3.fill_(-float(zm.analyse(x).h_s[1].max()) * 0.5)   # mask the hot part of frame 1
        scores = zm.analyse(x).score
        assert scores[1] > scores[0]
        zm.cfg = dataclasses.replace(zm.cfg, lambda0=float(scores.mean()))
        zm.taps.model.batches.clear()
        res = zm(x)
    assert res.flagged.tolist() == [False, True]
    assert zm.taps.model.batches == [2, 1]                      # second pass: the flagged frame only
    assert torch.all(res.mask[0] == 1)
    masked = res.mask[1, 0] == 0
    assert masked.any() and not masked.all()
    fill = zm.mean_color.view(3)
    assert torch.equal(res.defended_input[1][:, masked], fill[:, None].expand(3, int(masked.sum())))
    assert torch.equal(res.defended_input[1][:, ~masked], x[1][:, ~masked])
    assert torch.equal(res.defended_input[0], x[0])
    assert torch.equal(res.defended_output[0], res.output[0])
    with torch.no_grad():
        assert torch.allclose(res.defended_output[1:], zm.taps.model(res.defended_input[1:]))
    zm.cfg = dataclasses.replace(zm.cfg, lambda0=1e9)           # nothing flagged: one pass
    zm.taps.model.batches.clear()
    with torch.no_grad():
        res = zm(x)
    assert zm.taps.model.batches == [2] and res.defended_output is res.output
    assert torch.all(res.mask == 1)


def test_analyse_is_differentiable() -> None:
    zm = _toy_zmask()
    x = _clean(1).requires_grad_(True)
    res = zm.analyse(x)
    grad, = torch.autograd.grad(res.score.sum() + res.soft_mask.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------- shipped DDRNet on CamVid

def _camvid():
    from realtime.data import CamVid, DataNotFoundError
    try:
        return CamVid(None, "val")
    except (DataNotFoundError, FileNotFoundError) as err:
        pytest.skip(f"CamVid not available: {err}")


def test_ddrnet_patch_is_found_and_masked() -> None:
    from realtime.models import build_model
    ds = _camvid()
    model = build_model("ddrnet23_slim")
    model.requires_grad_(False)
    spec = model.layers()
    cfg = ZMaskConfig(shallow=tuple(spec.resolve(["rbb2", "rbb1", "rb1", "rb2"])),
                      deep=tuple(spec.resolve(["rbb2", "rbb1"])), spr=SPRConfig.for_input(360, 480))
    # statistics: plain per-channel mean/std over all working-size pixels of 5 clean frames
    with torch.no_grad(), ActivationTaps(model, cfg.layers) as taps:
        _, maps = taps(torch.stack([ds[i][0] for i in (0, 20, 40, 60, 80)]))
    mu = {n: to_work(m, cfg.spr).transpose(0, 1).flatten(1).mean(1) for n, m in maps.items()}
    sd = {n: to_work(m, cfg.spr).transpose(0, 1).flatten(1).std(1, unbiased=False) for n, m in maps.items()}
    stats = ChannelStats(mu, sd)
    fitted = fit_channel_stats([maps], cfg.spr)
    assert all(torch.allclose(fitted.mu[n], mu[n], atol=1e-5) and torch.allclose(fitted.sigma[n], sd[n], atol=1e-5)
               for n in cfg.layers)
    zm = ZMask(model, dataclasses.replace(cfg, lambda0=0.2), stats)

    # A high-contrast patch (16-px random binary blocks) pasted at rows 130:230, cols 170:310, then
    # four signed-gradient steps that raise its shallow over-activation (the beta=0 patch of the spec).
    x = ds[3][0][None]
    g = torch.Generator().manual_seed(0)
    blocks = (torch.rand(1, 3, 7, 9, generator=g) > 0.5).float()
    patch = F.interpolate(blocks, size=(100, 140), mode="nearest").requires_grad_(True)
    region = torch.zeros(1, 1, 360, 480)
    region[..., 130:230, 170:310] = 1.0
    inside = F.interpolate(region, size=cfg.spr.work_size, mode="bilinear", align_corners=False)[0, 0] > 0.5
    for _ in range(4):
        xp = x.clone()
        xp[:, :, 130:230, 170:310] = patch
        _, taps = zm.taps(xp)
        loss = sum(zscore(to_work(taps[n], cfg.spr), mu[n], sd[n])[..., inside].mean(-1).abs().mean()
                   for n in cfg.shallow)
        step, = torch.autograd.grad(loss, patch)
        with torch.no_grad():
            patch += 0.25 * step.sign()
            patch.clamp_(0, 1)
    xp = x.clone().detach()
    xp[:, :, 130:230, 170:310] = patch.detach()

    with torch.no_grad():
        res = zm(torch.cat([x, xp]))
    hs = res.h_s[:, 0]
    assert hs[1][inside].mean() > 3 * hs[1][~inside].mean()     # hot inside the patch
    assert hs[1][inside].mean() > hs[0][inside].mean()          # hotter than the clean twin there
    assert res.score[1] > 5 * res.score[0]
    assert res.flagged.tolist() == [False, True]
    m = res.mask[1, 0]
    assert res.mask.shape == (2, 1, 360, 480) and torch.all(res.mask[0] == 1)
    assert (m[130:230, 170:310] == 0).float().mean() > 0.2      # a good part of the patch is masked
    outside = torch.ones_like(m, dtype=torch.bool)
    outside[120:240, 160:320] = False
    assert (m[outside] == 0).float().mean() < 0.02              # and little else
    assert torch.equal(res.defended_input[1][:, m == 0],
                       model.mean_color.view(3, 1).expand(3, int((m == 0).sum())))
    assert res.defended_output.shape == (2, 11, 360, 480)
    assert torch.equal(res.defended_output[0], res.output[0])
