"""torchvision on a CPU-only machine: the pure-torch NMS fallback, and Z-Mask on a torchvision RetinaNet."""
from __future__ import annotations

from typing import List

import torch

from realtime.core.compat import import_torchvision, nms_reference
from realtime.defenses import ActivationTaps, SPRConfig, ZMask, ZMaskConfig, fit_channel_stats


def _brute_force_nms(boxes: List[List[float]], scores: List[float], thr: float) -> List[int]:
    """Greedy NMS with plain Python floats: the definition, nothing vectorised."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    suppressed = [False] * len(scores)
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        x1, y1, x2, y2 = boxes[i]
        for j in order[a + 1:]:
            u1, v1, u2, v2 = boxes[j]
            inter = max(0.0, min(x2, u2) - max(x1, u1)) * max(0.0, min(y2, v2) - max(y1, v1))
            union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
            if inter / union > thr:
                suppressed[j] = True
    return keep


def _random_boxes(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(5, 2, generator=g) * 80                # clusters, so many boxes overlap
    xy = centres[torch.randint(0, 5, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    wh = torch.rand(n, 2, generator=g) * 25 + 5
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randperm(n, generator=g).float() / n        # distinct scores: a unique answer
    return boxes, scores


def test_nms_matches_brute_force() -> None:
    tv = import_torchvision()
    for seed, thr in ((0, 0.5), (1, 0.3), (2, 0.7), (3, 0.0)):
        boxes, scores = _random_boxes(80, seed)
        want = _brute_force_nms(boxes.tolist(), scores.tolist(), thr)
        got = nms_reference(boxes, scores, thr)
        assert got.dtype == torch.int64 and got.tolist() == want
        assert 0 < len(want) < 80
        assert tv.ops.nms(boxes, scores, thr).tolist() == want    # whichever kernel torchvision uses
    empty = nms_reference(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    # hand case: box 3 duplicates box 0 with a higher score; box 1 overlaps box 3 with IoU 81/119
    b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    s = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms_reference(b, s, 0.5).tolist() == [3, 2]
    assert nms_reference(b, s, 0.68).tolist() == [3, 2]          # 81/119 = 0.6807 > 0.68
    assert nms_reference(b, s, 0.69).tolist() == [3, 1, 2]       # ... but not > 0.69
    assert tv.ops.batched_nms(b, s, torch.tensor([0, 0, 1, 1]), 0.5).tolist() == [3, 0, 2]


def test_retinanet_runs_under_zmask() -> None:
    tv = import_torchvision()
    assert import_torchvision() is tv                            # idempotent
    torch.manual_seed(0)
    model = tv.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                                      min_size=256, max_size=320).eval()
    model.requires_grad_(False)
    # the paper's RetinaNet layers (docs/zmask.md section 1)
    cfg = ZMaskConfig(shallow=("backbone.body.relu", "backbone.body.conv1", "backbone.body.layer1.0.conv1"),
                      deep=("backbone.body.conv1", "backbone.body.layer4", "backbone.body.layer1.0.conv1"),
                      spr=SPRConfig.for_input(256, 320, task="detection"), lambda0=-1.0)
    assert cfg.spr.work_size == (128, 160)
    assert cfg.spr.kernels_shallow == ((13, 13), (8, 8), (3, 3)) and cfg.spr.kernels_deep == ((26, 26), (13, 13))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), ActivationTaps(model, cfg.layers) as taps:
        _, maps = taps(torch.rand(2, 3, 256, 320, generator=g))
    assert maps["backbone.body.relu"].shape == (2, 64, 128, 160)
    assert maps["backbone.body.layer1.0.conv1"].shape == (2, 64, 64, 80)
    assert maps["backbone.body.layer4"].shape == (2, 2048, 8, 10)
    zm = ZMask(model, cfg, fit_channel_stats([maps], cfg.spr))
    assert torch.allclose(zm.mean_color.view(3), torch.tensor([0.485, 0.456, 0.406]))
    with torch.no_grad():
        res = zm(torch.rand(1, 3, 256, 320, generator=g))
    assert res.h_s.shape == res.h_d.shape == res.soft_mask.shape == (1, 1, 128, 160)
    assert res.mask.shape == (1, 1, 256, 320) and res.score.shape == (1,)
    assert torch.isfinite(res.h_s).all() and torch.isfinite(res.score).all()
    assert res.flagged.tolist() == [True]                        # lambda0 = -1: the second pass runs
    assert isinstance(res.output, list) and set(res.output[0]) == {"boxes", "scores", "labels"}
    assert isinstance(res.defended_output, list) and len(res.defended_output) == 1
    assert set(res.defended_output[0]) == {"boxes", "scores", "labels"}
