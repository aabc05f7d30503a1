import math

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from realtime.core.metrics import ConfusionMatrix
from realtime.core.losses import class_weights, segmentation_loss


def test_confusion_matrix_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 12, (4, 30, 40), generator=g)
    p = torch.randint(0, 11, (4, 30, 40), generator=g)
    cm = ConfusionMatrix(11, 11)
    cm.update(p[:2], y[:2])
    cm.update(p[2:], y[2:])
    keep = (y != 11).flatten().numpy()
    ref = confusion_matrix(y.flatten().numpy()[keep], p.flatten().numpy()[keep], labels=list(range(11)))
    assert np.array_equal(cm.mat.numpy(), ref)
    iou = np.diag(ref) / (ref.sum(0) + ref.sum(1) - np.diag(ref))
    assert np.allclose(cm.iou().numpy(), iou)


def test_confusion_matrix_valid_mask_and_absent_class():
    cm = ConfusionMatrix(3, 255)
    y = torch.tensor([[0, 0, 1, 255]])
    p = torch.tensor([[0, 1, 1, 2]])
    cm.update(p, y, valid=torch.tensor([[True, True, False, True]]))
    iou = cm.iou()
    assert math.isclose(iou[0].item(), 0.5) and iou[1].item() == 0.0 and math.isnan(iou[2].item())
    assert math.isclose(cm.summary(["a", "b", "c"])["miou"], 0.25)


def test_ohem_keeps_only_hard_pixels():
    # Two pixels: an easy one (p_true ~ 0.99) and a hard one (p_true ~ 0.27); void ignored.
    logits = torch.tensor([[5.0, 0.4], [0.0, 1.0]]).T.reshape(1, 2, 1, 2).repeat(1, 1, 1, 1)
    logits = torch.cat([logits, torch.zeros(1, 2, 1, 1)], dim=3)
    target = torch.tensor([[[0, 0, 255]]])
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")[0, 0]
    plain = segmentation_loss(logits, target, 255, ohem_thresh=None)
    assert torch.isclose(plain, ce[:2].mean())
    hard = segmentation_loss(logits, target, 255, ohem_thresh=0.7, min_kept_frac=0.0)
    assert torch.isclose(hard, ce[1])


def test_class_weights_up_weight_rare_classes():
    w = class_weights(torch.tensor([1000.0, 100.0, 10.0]), "medfreq")
    assert torch.allclose(w, torch.tensor([0.1, 1.0, 10.0]))
    assert torch.allclose(class_weights(torch.tensor([1000.0, 100.0, 10.0]), "sqrt_medfreq"), w.sqrt())
    assert class_weights(torch.tensor([1.0, 2.0]), "none") is None
