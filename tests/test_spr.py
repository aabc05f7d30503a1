"""SPR reference: z-score, box averages, the cascade, both modes, and the paper's settings."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from realtime.defenses.spr import (SPRConfig, aggregate, box_mean, cascade, layer_heatmap, resize,
                                   spr_heatmap, to_work, zscore)


def test_zscore_hand_values() -> None:
    h = torch.tensor([[[[1.0, 3.0]], [[10.0, 20.0]]]])          # (1,2,1,2)
    mu = torch.tensor([2.0, 10.0])
    sigma = torch.tensor([1.0, 5.0])
    z = zscore(h, mu, sigma, eps=0.0)
    assert torch.allclose(z, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))
    z_eps = zscore(h, mu, sigma)                                 # default eps = 1e-5 in the denominator
    assert z_eps[0, 1, 0, 1].item() == pytest.approx(10.0 / (5.0 + 1e-5), rel=1e-7)
    with pytest.raises(ValueError):
        zscore(h, torch.zeros(3), torch.ones(3))


def test_paper_settings_at_reference_sizes() -> None:
    seg = SPRConfig.for_input(1024, 2048)
    assert seg.work_size == (150, 300)
    assert seg.kernels_shallow == ((64, 128), (32, 64), (16, 32), (8, 16))
    assert seg.kernels_deep == ((64, 128), (32, 64))
    det = SPRConfig.for_input(800, 1000, task="detection")
    assert det.work_size == (400, 500)
    assert det.kernels_shallow == ((40, 40), (25, 25), (10, 10))
    assert det.kernels_deep == ((80, 80), (40, 40))


def test_scaled_settings_for_camvid_and_tiny_inputs() -> None:
    cfg = SPRConfig.for_input(360, 480)
    # 150*360/1024 = 52.73 -> 53, 300*480/2048 = 70.3 -> 70; 64*360/1024 = 22.5 -> 23 (half up)
    assert cfg.work_size == (53, 70)
    assert cfg.kernels_shallow == ((23, 30), (11, 15), (6, 8), (3, 4))
    assert cfg.kernels_deep == ((23, 30), (11, 15))
    tiny = SPRConfig.for_input(8, 8)
    assert tiny.work_size == (1, 1)
    assert all(k == (1, 1) for k in tiny.kernels_shallow + tiny.kernels_deep)
    with pytest.raises(ValueError):
        SPRConfig.for_input(360, 480, task="classification")
    with pytest.raises(ValueError):
        SPRConfig((10, 10), ((3, 3),), ((3, 3),), mode="valid")
    with pytest.raises(ValueError):                              # demo mode cannot pool past the map
        SPRConfig((10, 10), ((12, 3),), ((3, 3),), mode="demo")


def test_box_mean_same_hand_values_and_even_kernels() -> None:
    z = torch.arange(9.0).view(1, 1, 3, 3)                       # 0..8
    out = box_mean(z, (3, 3), "same")
    assert out.shape == z.shape
    assert out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3 + 4) / 4)   # clipped window, no pad counted
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0)
    assert out[0, 0, 2, 1].item() == pytest.approx((3 + 4 + 5 + 6 + 7 + 8) / 6)
    # an even kernel k uses the symmetric window k+1: (2,2) behaves as (3,3)
    assert torch.allclose(box_mean(z, (2, 2), "same"), out)
    demo = box_mean(z, (2, 2), "demo")
    assert torch.allclose(demo, torch.tensor([[[[2.0, 3.0], [5.0, 6.0]]]]))


def test_box_mean_matches_2d_pooling() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 17, 23, generator=g)
    for k in ((7, 9), (4, 6), (1, 1), (17, 23)):
        ph, pw = k[0] // 2, k[1] // 2
        ref = F.avg_pool2d(z, (2 * ph + 1, 2 * pw + 1), 1, (ph, pw), count_include_pad=False)
        assert torch.allclose(box_mean(z, k, "same"), ref, atol=1e-6)
        assert torch.allclose(box_mean(z, k, "demo"), F.avg_pool2d(z, k, 1), atol=1e-6)


def test_cascade_hand_values() -> None:
    p1 = torch.tensor([[[[1.0, 3.0]]]])
    p2 = torch.tensor([[[[2.0, 2.0]]]])
    p3 = torch.tensor([[[[1.0, 4.0]]]])
    h2 = cascade([p1, p2])                                       # p1 / (1 + 3) * p2
    assert torch.allclose(h2, torch.tensor([[[[0.5, 1.5]]]]))
    h3 = cascade([p1, p2, p3])                                   # h2 / (1 + 1.5) * p3
    assert torch.allclose(h3, torch.tensor([[[[0.2, 2.4]]]]))
    two = cascade([torch.cat([p1, 2 * p1]), torch.cat([p2, p2])])  # max is per sample
    assert torch.allclose(two[1], torch.tensor([[[2.0 / 7 * 2, 6.0 / 7 * 2]]]))


def _peak_centre(heat: torch.Tensor) -> tuple:
    """Centroid (row, col) of the pixels within 1e-6 (relative) of the map's maximum."""
    m = heat[0, 0]
    rows, cols = torch.nonzero(m >= m.max() * (1 - 1e-6), as_tuple=True)
    return rows.double().mean().item(), cols.double().mean().item()


def _square(hr: int, wr: int, r0: int, c0: int) -> torch.Tensor:
    z = torch.zeros(1, 8, hr, wr)
    z[:, :, r0:r0 + 5, c0:c0 + 5] = 10.0                        # 5x5 square centred at (r0+2, c0+2)
    return z


def test_same_mode_peak_sits_on_a_hot_square() -> None:
    cfg = SPRConfig.for_input(360, 480)
    hr, wr = cfg.work_size
    # Squares far enough from the border that no window around the peak is clipped (clipped windows
    # average over fewer pixels, which legitimately pulls the peak towards the border).
    for r0, c0 in ((20, 30), (26, 36), (29, 28)):
        z = _square(hr, wr, r0, c0)
        for kernels in (cfg.kernels_shallow, cfg.kernels_deep, ((4, 4),)):
            heat = spr_heatmap(z, kernels, "same")
            assert heat.shape == (1, 1, hr, wr)
            assert heat[0, 0, r0 + 2, c0 + 2].item() == pytest.approx(heat.max().item(), rel=1e-6)
            assert _peak_centre(heat) == pytest.approx((r0 + 2.0, c0 + 2.0), abs=1e-9)   # exact
            assert heat.min().item() == 0.0                      # far from the square: nothing


def test_demo_mode_pushes_peaks_away_from_the_centre() -> None:
    cfg = SPRConfig.for_input(360, 480, mode="demo")
    hr, wr = cfg.work_size
    r, c = _peak_centre(spr_heatmap(_square(hr, wr, 10, 12), cfg.kernels_deep, "demo"))
    assert r < 12 - 2 and c < 14 - 2                             # square centre (12, 14)
    r, c = _peak_centre(spr_heatmap(_square(hr, wr, 40, 55), cfg.kernels_deep, "demo"))
    assert r > 42 + 2 and c > 57 + 2                             # square centre (42, 57)


def _demo_reference(z: torch.Tensor, kernels) -> torch.Tensor:
    """The published demo, written out directly: unpadded AvgPool2d, nearest resize, H/(1+max)*p."""
    size = z.shape[-2:]
    heat = None
    for k in kernels:
        pooled = torch.nn.AvgPool2d(kernel_size=k, stride=1)(z)
        p = F.interpolate(pooled.abs(), size=size, mode="nearest").mean(dim=1, keepdim=True)
        if heat is None:
            heat = p
        else:
            mx = heat.view(heat.shape[0], -1).max(dim=1).values.view(-1, 1, 1, 1)
            heat = heat / (1 + mx) * p
    return heat


def test_demo_mode_matches_published_formula() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, 30, 40, generator=g) * 2 + 0.5
    for kernels in (((12, 16), (6, 8), (3, 4), (2, 2)), ((25, 30), (9, 9))):
        ours = spr_heatmap(z, kernels, "demo")
        ref = _demo_reference(z, kernels)
        assert ours.shape == (3, 1, 30, 40)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_layer_heatmap_resizes_then_scores() -> None:
    g = torch.Generator().manual_seed(2)
    cfg = SPRConfig.for_input(360, 480)
    feat = torch.randn(2, 4, 45, 60, generator=g)
    mu, sigma = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    work = to_work(feat, cfg)
    assert work.shape == (2, 4, 53, 70)
    assert torch.allclose(work, F.interpolate(feat, size=(53, 70), mode="bilinear", align_corners=False))
    heat = layer_heatmap(feat, mu, sigma, cfg.kernels_shallow, cfg)
    assert heat.shape == (2, 1, 53, 70)
    assert torch.allclose(heat, spr_heatmap(zscore(work, mu, sigma), cfg.kernels_shallow, "same"))
    demo_cfg = SPRConfig.for_input(360, 480, mode="demo")
    assert torch.equal(to_work(feat, demo_cfg), F.interpolate(feat, size=(53, 70), mode="nearest"))
    assert resize(work, (53, 70), "same") is work                # same size: untouched
    with pytest.raises(ValueError):
        to_work(feat[0], cfg)


def test_aggregate_is_pixelwise_max() -> None:
    a = torch.tensor([[[[1.0, 5.0], [0.0, 2.0]]]])
    b = torch.tensor([[[[3.0, 4.0], [0.5, 2.0]]]])
    assert torch.equal(aggregate([a, b]), torch.tensor([[[[3.0, 5.0], [0.5, 2.0]]]]))
    assert torch.equal(aggregate([a]), a)
    with pytest.raises(ValueError):
        aggregate([])
