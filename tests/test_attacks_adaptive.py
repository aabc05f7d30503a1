import pytest
import torch

from realtime.attacks import EOTConfig, Placement, CaptureConfig, apply_patch, craft_universal_patch
from realtime.attacks.adaptive import DefenseAwareLoss, OverActivationLoss, TappedForward
from realtime.data import CamVid
from realtime.defenses import SPRConfig, ZMask, ZMaskConfig, fit_channel_stats
from realtime.models import build_model

LAYERS = ("layer1", "layer3_")


@pytest.fixture(scope="module")
def setup(camvid_root):
    torch.manual_seed(0)
    model = build_model("ddrnet23_slim")
    ds = CamVid(camvid_root, "train")
    imgs, labs = ds.to_tensors(range(0, 40, 8))
    imgs = torch.nn.functional.interpolate(imgs.float(), size=(120, 160), mode="area").round().to(torch.uint8)
    labs = torch.nn.functional.interpolate(labs[:, None].float(), size=(120, 160), mode="nearest")[:, 0].to(torch.uint8)
    spr = SPRConfig.for_input(120, 160)
    tapped = TappedForward(model, LAYERS)
    with torch.no_grad():
        tapped(imgs.float() / 255)
    stats = fit_channel_stats([tapped.last], spr)
    return model, tapped, imgs, labs, spr, stats


def test_over_activation_loss_is_minimised(setup):
    model, tapped, imgs, labs, spr, stats = setup
    loss_fn = OverActivationLoss(tapped, LAYERS, stats.mu, stats.sigma, spr)
    patch = torch.rand(3, 40, 54, generator=torch.Generator().manual_seed(1))
    x = imgs[:2].float() / 255

    def value(p):
        px, m = apply_patch(x, p, Placement("fixed", top_left=(30, 40)))
        tapped(px)
        return loss_fn(px, m, None)

    before = float(value(patch))
    cfg = EOTConfig(hw=(40, 54), steps=8, batch_size=2, lr=0.05, beta=0.0, tv_weight=0.0,
                    capture=CaptureConfig.none(), placement=Placement("fixed", top_left=(30, 40)), seed=1)
    crafted, hist = craft_universal_patch(tapped, imgs[:2], labs[:2], cfg, "cpu", progress=False, extra_loss=loss_fn)
    assert float(value(crafted)) < 0.8 * before
    assert all(h["extra"] >= 0 for h in hist)


def test_adv_flag_pushes_score_down(setup):
    model, tapped, imgs, labs, spr, stats = setup
    zm = ZMask(model, ZMaskConfig(shallow=LAYERS, deep=LAYERS, spr=spr, lambda0=0.0), stats)
    tapped_all = TappedForward(model, LAYERS)
    loss_fn = DefenseAwareLoss(tapped_all, zm, "flag")
    x = imgs[:2].float() / 255
    place = Placement("fixed", top_left=(30, 40))
    start = torch.rand(3, 40, 54, generator=torch.Generator().manual_seed(2))

    def score(p):
        with torch.no_grad():
            return float(zm.analyse(apply_patch(x, p, place)[0]).score.mean())

    cfg = EOTConfig(hw=(40, 54), steps=8, batch_size=2, lr=0.05, beta=0.0, tv_weight=0.0,
                    capture=CaptureConfig.none(), placement=place, seed=2)
    crafted, _ = craft_universal_patch(tapped_all, imgs[:2], labs[:2], cfg, "cpu", progress=False,
                                       extra_loss=loss_fn)
    assert score(crafted) < score(start)
    with pytest.raises(ValueError, match="mask' or 'flag"):
        DefenseAwareLoss(tapped_all, zm, "both")
