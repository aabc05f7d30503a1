"""PatchZero (Xu et al., WACV 2023): a pixel-level patch detector, then repaint the detected region.

The paper's detector is a PSPNet; ours is a compact encoder-decoder (``PatchDetector``, ~0.5 M
parameters) so it trains on a CPU. It predicts per pixel "adversarial patch or not". The defense
resizes any input to the detector's working size (the size it was trained at), upsamples the
probability back, thresholds it, keeps only frames whose detected area exceeds ``min_area`` (smaller
specks are treated as noise and not repainted), dilates the region by a few pixels and repaints it with
the model's mean colour, ``X' = X * M + mean * (1 - M)``, before the second model pass. The score is the
maximum patch probability, so the defense doubles as a detector.

Weights: ``realtime/defenses/weights/patchzero_camvid.pt`` (fp16 state dict, one detector for every
CamVid model) with a JSON sidecar holding the training settings and validation precision/recall/F1;
train with ``python -m calibration.patchzero_train``. Stage 2 of the paper (BPDA adversarial
training against adaptive attacks) is not implemented.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from realtime.models.base import CAMVID_MEAN, CAMVID_STD

from .base import Defense, DefenseResult, StageTimer, dilate, repaint
from .registry import DefenseContext, register_defense
from .zmask import merge_batch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "patchzero_camvid.pt"


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PatchDetector(nn.Module):
    """Compact U-Net-like patch segmenter: 4 stride-2 stages (down to 1/16), dilated context, skip decoder.

    Input (N,3,H,W) in [0,1] (normalised inside with the CamVid mean/std), output logits (N,1,H,W)
    of "this pixel belongs to an adversarial patch". Any H, W work (features are resized to the skips).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3, w4 = width, 2 * width, 4 * width, 6 * width
        self.register_buffer("mean", torch.tensor(CAMVID_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CAMVID_STD).view(1, 3, 1, 1))
        self.enc1 = nn.Sequential(_cbr(3, w1, 2), _cbr(w1, w1))
        self.enc2 = nn.Sequential(_cbr(w1, w2, 2), _cbr(w2, w2))
        self.enc3 = nn.Sequential(_cbr(w2, w3, 2), _cbr(w3, w3))
        self.enc4 = nn.Sequential(_cbr(w3, w4, 2), _cbr(w4, w4, dilation=2), _cbr(w4, w4, dilation=4))
        self.dec3 = _cbr(w4 + w3, w3)
        self.dec2 = _cbr(w3 + w2, w2)
        self.dec1 = _cbr(w2 + w1, w1)
        self.head = nn.Conv2d(w1, 1, 1)

    @staticmethod
    def _up_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, skip], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        e1 = self.enc1((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        d = self.dec3(self._up_cat(e4, e3))
        d = self.dec2(self._up_cat(d, e2))
        d = self.dec1(self._up_cat(d, e1))
        return F.interpolate(self.head(d), size=(h, w), mode="bilinear", align_corners=False)


@dataclass
class PatchZeroConfig:
    """Inference settings. ``work_size`` (h, w): the detector's input size (its training size);
    ``threshold`` on the patch probability; ``dilate`` pixels at input resolution; ``min_area``: a frame is
    flagged (and repainted) when its detected fraction exceeds this; the shipped value is fitted for 1 %
    flagged clean CamVid TRAIN frames (see ``patchzero_train``)."""
    work_size: Tuple[int, int] = (180, 240)
    threshold: float = 0.5
    dilate: int = 4
    min_area: float = 0.002

    def __post_init__(self) -> None:
        if len(self.work_size) != 2 or min(self.work_size) < 16:
            raise ValueError(f"work_size must be (h, w) with both >= 16, got {self.work_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.dilate < 0 or not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"dilate must be >= 0 and min_area in [0, 1), got {self.dilate}, {self.min_area}")
        self.work_size = (int(self.work_size[0]), int(self.work_size[1]))


def load_detector(path: Optional[str | Path] = None, device: torch.device | str = "cpu"
                  ) -> Tuple[PatchDetector, Dict[str, Any]]:
    """The trained detector (fp32, eval mode) and its JSON sidecar (``{}`` when absent)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"PatchZero weights {path} not found; train them with "
                                f"`python -m calibration.patchzero_train --out {path}`")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    net = PatchDetector(width=int(meta.get("train", {}).get("width", 16)))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    state = state.get("model", state)
    ref = net.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    return net.to(device).eval(), meta


def detect(net: PatchDetector, x: torch.Tensor, work_size: Tuple[int, int]) -> torch.Tensor:
    """Patch probability (N,1,H,W) at the input size; the detector runs at ``work_size``."""
    small = F.interpolate(x, size=work_size, mode="bilinear", align_corners=False, antialias=True) \
        if tuple(x.shape[-2:]) != tuple(work_size) else x
    prob = torch.sigmoid(net(small))
    if prob.shape[-2:] != x.shape[-2:]:
        prob = F.interpolate(prob, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return prob


def dilate_mask(region: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a (N,1,H,W) {0,1} map with a (2r+1)^2 square (``base.dilate``)."""
    return dilate(region, radius)


class PatchZero(Defense):
    """Detector -> threshold -> area check -> dilate -> repaint with the mean colour -> model."""
    name = "patchzero"
    masks = True
    flags = True

    def __init__(self, model: nn.Module, detector: PatchDetector, cfg: Optional[PatchZeroConfig] = None,
                 forward: Optional[Any] = None, meta: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(model)
        self.detector = detector.eval()
        self.cfg = cfg or PatchZeroConfig()
        self.forward = forward or model
        self.meta = meta or {}
        fill = getattr(model, "mean_color", None)
        self.fill = fill if isinstance(fill, torch.Tensor) else torch.tensor(CAMVID_MEAN).view(1, 3, 1, 1)

    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        cfg = self.cfg
        with timer("backbone"):
            out = self.forward(x)
        with timer("detector"):
            with torch.no_grad():
                prob = detect(self.detector.to(x.device), x.detach(), cfg.work_size).to(x.dtype)
            region = (prob > cfg.threshold).to(x.dtype)
            area = region.flatten(1).mean(1)
            flagged = area > cfg.min_area
            score = prob.flatten(1).amax(1)
        with timer("mask"):
            region = region * flagged.view(-1, 1, 1, 1).to(x.dtype)
            keep = 1.0 - dilate_mask(region, cfg.dilate)
            xd = repaint(x, keep, self.fill)
        final = out
        with timer("second_pass"):
            index = torch.nonzero(flagged, as_tuple=False).flatten()
            if index.numel():
                final = merge_batch(out, self.forward(xd.index_select(0, index)), index, x.shape[0])
        return DefenseResult(output=final, defended_input=xd, mask=keep, flagged=flagged, score=score,
                             first_output=out, extras={"patch_prob": prob, "area": area})

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), **asdict(self.cfg), "val_metrics": self.meta.get("val", {})}


@register_defense("patchzero")
def _build_patchzero(ctx: DefenseContext, weights: Optional[str] = None, **options: Any) -> Defense:
    """PatchZero with the shipped detector (or ``weights``); ``options`` override ``PatchZeroConfig``."""
    net, meta = load_detector(weights, ctx.device)
    base = meta.get("inference", {})
    fields = {k: base[k] for k in ("work_size", "threshold", "dilate", "min_area") if k in base}
    fields.update(options)
    if "work_size" in fields:
        fields["work_size"] = tuple(fields["work_size"])
    return PatchZero(ctx.model, net, PatchZeroConfig(**fields), ctx.forward(), meta)


def pixel_counts(pred: torch.Tensor, target: torch.Tensor) -> List[int]:
    """[tp, fp, fn] of two {0,1} maps, summed over everything."""
    p, t = pred.bool(), target.bool()
    return [int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())]


def prf(tp: int, fp: int, fn: int) -> Dict[str, float]:
    """Precision, recall and F1 from pixel counts (0 where undefined)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


__all__ = ["DEFAULT_WEIGHTS", "PatchDetector", "PatchZero", "PatchZeroConfig", "detect", "dilate_mask",
           "load_detector", "pixel_counts", "prf"]
