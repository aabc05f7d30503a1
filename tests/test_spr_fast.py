"""The running-sum SPR path against the avg_pool reference (spr.py), the oracle."""
import pytest
import torch

from realtime.defenses.spr import box_mean, pooled_map
from realtime.defenses.spr_fast import box_means, pooled_maps

CASES = [
    (3, 53, 70, [(23, 30), (11, 15), (6, 8), (3, 4)]),      # CamVid 360x480 shallow kernels
    (4, 7, 9, [(7, 9), (4, 2), (1, 1), (6, 3)]),             # kernels as large as the map, even, unit
    (2, 40, 11, [(40, 11), (39, 2), (2, 10)]),               # tall map, kernels beyond half the grid
]


@pytest.mark.parametrize("mode", ["same", "demo"])
@pytest.mark.parametrize("c,h,w,kernels", CASES)
def test_box_means_match_reference(mode, c, h, w, kernels):
    g = torch.Generator().manual_seed(h * w)
    z = torch.randn(2, c, h, w, generator=g) * 3 + 1
    for k, fast in zip(kernels, box_means(z, kernels, mode)):
        ref = box_mean(z, k, mode)
        assert fast.shape == ref.shape
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["same", "demo"])
def test_pooled_maps_match_reference_on_a_large_grid(mode):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 5, 150, 300, generator=g) * 4 - 2      # the paper's 1024x2048 working size
    kernels = [(64, 128), (32, 64), (16, 32), (8, 16)]
    for k, fast in zip(kernels, pooled_maps(z, kernels, mode)):
        ref = pooled_map(z, k, mode)
        assert fast.shape == ref.shape == (1, 1, 150, 300)
        assert ((fast - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_box_means_is_exact_on_a_hand_case():
    z = torch.arange(5.0).view(1, 1, 1, 5)          # 0 1 2 3 4
    (same,) = box_means(z, [(1, 3)], "same")
    torch.testing.assert_close(same, torch.tensor([[[[0.5, 1.0, 2.0, 3.0, 3.5]]]]))
    (demo,) = box_means(z, [(1, 2)], "demo")
    torch.testing.assert_close(demo, torch.tensor([[[[0.5, 1.5, 2.5, 3.5]]]]))


def test_box_means_rejects_bad_input():
    with pytest.raises(ValueError, match="N,C,H,W"):
        box_means(torch.zeros(3, 4, 5), [(1, 1)])
    with pytest.raises(ValueError, match="larger than the map"):
        box_means(torch.zeros(1, 1, 4, 4), [(5, 1)], "demo")
    with pytest.raises(ValueError, match="mode"):
        box_means(torch.zeros(1, 1, 4, 4), [(1, 1)], "valid")
