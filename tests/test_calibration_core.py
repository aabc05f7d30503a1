import numpy as np
import pytest
import torch

from calibration.roc import roc_report, threshold_for_fpr
from realtime.defenses.stats import LayerStatsAccumulator, RunningChannelStats


def test_streaming_stats_equal_pooled_stats_any_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 5, 6, generator=g) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 3
    pooled = x.transpose(0, 1).reshape(3, -1)
    for split in ([7], [1, 6], [3, 2, 2]):
        acc = RunningChannelStats()
        for part in torch.split(x, split):
            acc.update(part)
        mu, sigma = acc.result()
        assert torch.allclose(mu, pooled.mean(1), atol=1e-5)
        assert torch.allclose(sigma, pooled.std(1, unbiased=False), atol=1e-5)


def test_stats_reject_nan_and_channel_change():
    acc = LayerStatsAccumulator()
    acc.update({"a": torch.ones(1, 2, 3, 3)})
    with pytest.raises(ValueError, match="channel"):
        acc.update({"a": torch.ones(1, 3, 3, 3)})
    with pytest.raises(ValueError, match="non-finite"):
        RunningChannelStats().update(torch.full((1, 1, 2, 2), float("nan")))


def test_lambda0_respects_fpr_and_youden():
    clean = np.arange(100, dtype=float)               # 0..99
    patched = np.arange(50, 150, dtype=float)         # overlaps clean in 50..99
    t = threshold_for_fpr(clean, 0.01)
    assert t == 98.0 and (clean > t).mean() <= 0.01
    rep = roc_report(clean, patched, max_fpr=0.01)
    assert rep.chosen.fpr <= 0.01 and rep.chosen.threshold == 98.0
    assert rep.chosen.tpr == pytest.approx(51 / 100)   # patched scores 99..149 exceed 98
    assert 0.8 < rep.auc < 0.9                          # 0.875 for this overlap
    assert rep.youden.tpr - rep.youden.fpr == pytest.approx(0.5)
    sep = roc_report(np.zeros(10), np.ones(10))
    assert sep.auc == 1.0 and sep.chosen.tpr == 1.0 and sep.chosen.fpr == 0.0


def test_best_mask_threshold_picks_the_iou_maximum() -> None:
    from calibration.fusion_train import best_mask_threshold
    gt = torch.zeros(1, 1, 10, 10)
    gt[..., 2:8, 2:8] = 1                                   # 36 true pixels
    soft = torch.zeros(1, 1, 10, 10)
    soft[..., 2:8, 2:8] = 0.15                              # the patch's rim: weak
    soft[..., 4:6, 4:6] = 0.9                               # its centre: strong
    thr, ious = best_mask_threshold(soft, gt, grid=(0.1, 0.2, 0.5))
    assert thr == 0.1 and ious[0.1] == 1.0
    assert ious[0.2] == ious[0.5] == 4 / 36
    thr, _ = best_mask_threshold(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), grid=(0.1, 0.5))
    assert thr == 0.5                                       # nothing to mask: ties go to the higher threshold
