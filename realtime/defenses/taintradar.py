"""TaintRadar (Li et al., INFOCOM 2021) adapted from classification to semantic segmentation.

The original ranks the labels of one image; a segmenter predicts a label per pixel. Our adaptation, per
frame (frames are processed one at a time; the result is batch-correct):
1. Grad-CAM on the features entering the segmentation head (``final_layer`` for ddrnet23_slim, ``head``
   for bisenetv1: the segmenter's "last conv layer") for the loss ``-CE(softmax(z / T), pred)`` summed
   over every pixel, T = 2: the map of what drives the whole prediction. Binarised at 0.15 of its max it
   is the suspicious region R (an adversarial patch is expected to dominate it).
2. The label under test is the region's label: ``y0 = argmax`` of the logits averaged over R (rank 0).
3. R is filled with uniform noise; the K = min(9, classes - 1) classes (other than y0) whose R-averaged
   logits rose the most are the candidate true labels.
4. For each candidate k, the negative Grad-CAM ``ReLU(-sum_c a_c A_c)`` of the summed log-probability of k
   over R (on the original frame), binarised at 0.15 of its max; the K masks are intersected (the pixels
   that argue against every candidate: the taint).
5. That region is filled with noise and the model runs again; the frame is flagged when the rank of y0
   over R (the number of classes whose R-averaged logit beats it) rose above delta_R = 2.
Output: for flagged frames the second pass on the filled frame (mask = 1 outside the filled region),
otherwise the first pass (mask all ones). Score: the rank drop. Three forward passes per frame; the
Grad-CAM backward passes only traverse the head (its input is detached inside a pre-hook).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Defense, DefenseResult, StageTimer
from .registry import DefenseContext, register_defense

CAM_LAYERS: Dict[str, str] = {"ddrnet23_slim": "final_layer", "bisenetv1": "head"}


@dataclass
class TaintRadarConfig:
    """Settings: softmax temperature, Grad-CAM binarisation (fraction of max), candidates K (None =
    min(9, classes - 1)), rank-drop threshold delta_R, noise seed (fill is reproducible per call)."""
    temperature: float = 2.0
    cam_threshold: float = 0.15
    top_k: Optional[int] = None
    delta_rank: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.cam_threshold < 1 or self.delta_rank < 0:
            raise ValueError(f"bad TaintRadar settings: {self}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class _HeadInput:
    """Pre-hook that replaces the head's input with a leaf tensor requiring grad, and keeps it."""

    def __init__(self, module: nn.Module) -> None:
        self.feat: Optional[torch.Tensor] = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        self.feat = args[0].detach().requires_grad_(True)
        return (self.feat, *args[1:])


def grad_cam(feat: torch.Tensor, loss: torch.Tensor, size: Tuple[int, int], negative: bool = False
             ) -> torch.Tensor:
    """(1,1,H,W) Grad-CAM of ``loss`` w.r.t. ``feat`` (1,C,h,w), ReLU'd, upsampled, divided by its max."""
    (grad,) = torch.autograd.grad(loss, feat, retain_graph=True)
    weights = grad.mean((2, 3), keepdim=True)
    cam = (weights * feat.detach()).sum(1, keepdim=True)
    cam = F.relu(-cam if negative else cam)
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam / cam.amax().clamp(min=1e-12)


def region_mean(logits: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(C,) logits averaged over the pixels of ``region`` (1,1,H,W) {0,1} (whole frame when empty)."""
    w = region if float(region.sum()) > 0 else torch.ones_like(region)
    return (logits * w).sum((0, 2, 3)) / w.sum()


def rank_of(scores: torch.Tensor, label: int) -> int:
    """How many classes score strictly higher than ``label``."""
    return int((scores > scores[label]).sum())


class TaintRadar(Defense):
    """Grad-CAM region -> noise fill -> candidate labels -> negative Grad-CAM taint -> fill -> rank test."""
    name = "taintradar"
    masks = True
    flags = True
    needs_grad = True

    def __init__(self, model: nn.Module, cam_layer: str, cfg: Optional[TaintRadarConfig] = None) -> None:
        super().__init__(model)
        modules = dict(model.named_modules())
        if cam_layer not in modules:
            raise KeyError(f"Grad-CAM layer {cam_layer!r} not in {type(model).__name__}")
        self.cam_layer = cam_layer
        self.head = modules[cam_layer]
        self.cfg = cfg or TaintRadarConfig()

    def _forward(self, x: torch.Tensor, hook: _HeadInput) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.model(x)
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or hook.feat is None:
            raise TypeError("TaintRadar needs a model returning dense logits through the hooked head")
        return z, hook.feat

    def _frame(self, x: torch.Tensor, timer: StageTimer) -> Dict[str, Any]:
        cfg, size = self.cfg, (x.shape[-2], x.shape[-1])
        gen = torch.Generator().manual_seed(cfg.seed)          # same noise for a frame wherever it sits
        hook = _HeadInput(self.head)
        try:
            with timer("backbone"):
                z, feat = self._forward(x, hook)
            num_classes = z.shape[1]
            k = min(cfg.top_k or 9, num_classes - 1)
            with timer("saliency"):
                logp = torch.log_softmax(z.float() / cfg.temperature, 1)
                pred = z.detach().argmax(1, keepdim=True)
                cam = grad_cam(feat, logp.gather(1, pred).sum(), size)
                region = (cam >= cfg.cam_threshold).to(x.dtype)
                before = region_mean(z.detach().float(), region)
                y0 = int(before.argmax())
                noise = torch.rand(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
                with torch.no_grad():
                    z1 = self.model(x * (1 - region) + noise * region).float()
                rise = region_mean(z1, region) - before
                rise[y0] = -float("inf")
                cands = rise.topk(k).indices.tolist()
                taint = torch.ones_like(region)
                for c in cands:
                    neg = grad_cam(feat, (logp[:, c:c + 1] * region).sum(), size, negative=True)
                    taint = taint * (neg >= cfg.cam_threshold).to(x.dtype)
            with timer("second_pass"), torch.no_grad():
                xd = x * (1 - taint) + noise * taint
                z2 = self.model(xd)
                drop = rank_of(region_mean(z2.float(), region), y0) - rank_of(before, y0)
        finally:
            hook.handle.remove()
        return {"first": z.detach(), "second": z2, "defended": xd, "taint": taint, "region": region,
                "drop": drop, "label": y0, "candidates": cands}

    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        outs, firsts, inputs, masks, scores, flags, regions = [], [], [], [], [], [], []
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(x.shape[0]):
                r = self._frame(x[i:i + 1].detach().clone(), timer)
                flagged = r["drop"] > self.cfg.delta_rank
                firsts.append(r["first"])
                outs.append(r["second"] if flagged else r["first"])
                inputs.append(r["defended"] if flagged else x[i:i + 1].detach().clone())
                masks.append(1 - r["taint"] if flagged else torch.ones_like(r["taint"]))
                scores.append(float(r["drop"]))
                flags.append(flagged)
                regions.append(r["region"])
        dev = x.device
        return DefenseResult(output=torch.cat(outs), defended_input=torch.cat(inputs), mask=torch.cat(masks),
                             flagged=torch.tensor(flags, device=dev), score=torch.tensor(scores, device=dev),
                             first_output=torch.cat(firsts), extras={"cam_region": torch.cat(regions)})

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "cam_layer": self.cam_layer, **asdict(self.cfg)}


@register_defense("taintradar")
def _build_taintradar(ctx: DefenseContext, cam_layer: Optional[str] = None, **options: Any) -> Defense:
    """TaintRadar on ``ctx.model``; the Grad-CAM layer defaults to the model's head input."""
    layer = cam_layer or CAM_LAYERS.get(ctx.model_name)
    if layer is None:
        raise KeyError(f"no default Grad-CAM layer for model {ctx.model_name!r}; pass cam_layer=")
    return TaintRadar(ctx.model, layer, TaintRadarConfig(**options))


__all__ = ["CAM_LAYERS", "TaintRadar", "TaintRadarConfig", "grad_cam", "rank_of", "region_mean"]
