"""Universal EOT adversarial patches against detectors (zmask.md section 5, detection experiments).

Losses are the detector's own training losses, computed in eval mode (BatchNorm frozen, no dropout)
through the model's internals, so they are differentiable w.r.t. the input image and the patch:
``transform -> backbone -> head -> anchors -> compute_loss``. Supported: torchvision ``FCOS``
(``classification``, ``bbox_regression``, ``bbox_ctrness``) and ``RetinaNet`` (``classification``,
``bbox_regression``); other detectors raise ``NotImplementedError``.

Objectives (the attacker MINIMISES a weighted sum; with ``normalize_grads`` each term's gradient w.r.t.
the patch is scaled to unit L2 norm first, as in :mod:`realtime.attacks.eot`):

* ``eot`` (paper: class-untargeted): targets = the frame's ground-truth boxes, minus those at least
  ``max_covered`` (50 %) covered by the pasted patch (the patch hides them legitimately);
  ``w_class * L_cls + w_regr * L_regr (+ w_ctrness * L_ctrness) + tv_weight * TV`` with
  ``w_class < 0`` (push the classification away from the truth) and ``w_regr > 0``.
* ``apricot`` (false detection, APRICOT-style): targets = the GT boxes plus the bounding box of the
  pasted patch labelled ``target_class``; all weights positive: the detector is trained, through the
  patch pixels only, to see an object where the patch is.

EOT over random placement and the physical capture simulation of :mod:`realtime.attacks.apply`, or, with
``scene`` set, over posters on each frame's facades in perspective, occluded by its foreground objects
(:mod:`realtime.attacks.scene`, the renderer the physical benchmarks use; needs the frames' label maps);
Adam in pixel space with clamping to [0, 1]; checkpoint/resume like the segmentation crafting.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from .apply import CaptureConfig, Placement, apply_patch, patch_size_for
from .eot import _combine, save_checkpoint, start_patch, total_variation
from .scene import SceneConfig, SceneSampler

Target = Dict[str, torch.Tensor]
KINDS: Tuple[str, ...] = ("eot", "apricot")
HISTORY_KEYS: Tuple[str, ...] = ("loss", "cls", "regr", "ctrness", "tv", "gt")
_DEFAULT_WEIGHTS = {"eot": (-1.0, 0.1, 0.0), "apricot": (1.0, 1.0, 1.0)}     # (w_class, w_regr, w_ctrness)


def _torchvision_kind(model: torch.nn.Module) -> str:
    from torchvision.models.detection import FCOS, RetinaNet
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, RetinaNet):
        return "retinanet"
    raise NotImplementedError(
        f"detection losses are implemented for torchvision FCOS and RetinaNet only, not "
        f"{type(model).__name__} ({getattr(model, 'model_name', '?')}); add its loss path in "
        "realtime.attacks.detection.detection_losses")


def detection_losses(model: torch.nn.Module, images: torch.Tensor | Sequence[torch.Tensor],
                     targets: Sequence[Target]) -> Dict[str, torch.Tensor]:
    """The detector's training loss dict for ``images`` ((N,3,H,W) or list of (3,H,W), in [0,1]) and
    torchvision ``targets`` (``boxes`` xyxy pixels, ``labels`` 1..C), computed WITHOUT switching the model
    to train mode (BatchNorm keeps its running statistics). Differentiable w.r.t. ``images``.

    FCOS -> ``classification``, ``bbox_regression``, ``bbox_ctrness``; RetinaNet -> ``classification``,
    ``bbox_regression``. Other detectors: ``NotImplementedError``.
    """
    kind = _torchvision_kind(model)
    imgs = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    if len(imgs) != len(targets):
        raise ValueError(f"{len(imgs)} images but {len(targets)} targets")
    tgts = [{"boxes": t["boxes"].to(imgs[0].device, torch.float32).reshape(-1, 4),
             "labels": t["labels"].to(imgs[0].device, torch.int64).reshape(-1)} for t in targets]
    image_list, tgts = model.transform(imgs, tgts)
    features = model.backbone(image_list.tensors)
    features = list(features.values()) if isinstance(features, dict) else [features]
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    if kind == "fcos":
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
        return model.compute_loss(tgts, head_outputs, anchors, num_anchors_per_level)
    return model.compute_loss(tgts, head_outputs, anchors)


def mask_bbox(mask: torch.Tensor) -> torch.Tensor:
    """xyxy box (x2/y2 exclusive, float) of the nonzero pixels of one (1,H,W) or (H,W) mask."""
    m = mask.reshape(mask.shape[-2:]) > 0.5
    ys, xs = torch.nonzero(m, as_tuple=True)
    if len(ys) == 0:
        raise ValueError("empty patch mask: the patch was not pasted")
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def covered_fraction(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K,) fraction of each xyxy box's pixel area covered by the (1,H,W)/(H,W) mask."""
    m = mask.reshape(mask.shape[-2:]).float()
    H, W = m.shape
    integral = torch.zeros(H + 1, W + 1, dtype=torch.float64, device=m.device)
    integral[1:, 1:] = m.double().cumsum(0).cumsum(1)
    b = boxes.reshape(-1, 4).round().long()
    x1, x2 = b[:, 0].clamp(0, W), b[:, 2].clamp(0, W)
    y1, y2 = b[:, 1].clamp(0, H), b[:, 3].clamp(0, H)
    inside = integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]
    area = ((x2 - x1) * (y2 - y1)).double()
    return (inside / area.clamp(min=1)).float()


def attack_targets(targets: Sequence[Target], mask: torch.Tensor, kind: str, target_label: int = 1,
                   max_covered: float = 0.5) -> List[Target]:
    """Per-sample targets for one step: GT boxes that the patch (``mask`` (N,1,H,W)) covers less than
    ``max_covered`` of; for ``apricot`` plus the patch's bounding box labelled ``target_label``."""
    out = []
    for t, m in zip(targets, mask):
        boxes = t["boxes"].to(m.device, torch.float32).reshape(-1, 4)
        labels = t["labels"].to(m.device, torch.int64).reshape(-1)
        keep = covered_fraction(boxes, m) < max_covered
        boxes, labels = boxes[keep], labels[keep]
        if kind == "apricot" and bool((m > 0.5).any()):     # a poster hidden by occluders adds no fake box
            boxes = torch.cat([boxes, mask_bbox(m).view(1, 4)])
            labels = torch.cat([labels, labels.new_tensor([target_label])])
        out.append({"boxes": boxes, "labels": labels})
    return out


@dataclass
class DetectionAttackConfig:
    """Settings of one universal detection patch (see the module docstring for the objectives).
    ``w_*`` left ``None`` take the kind's defaults: eot (-1, 0.1, 0), apricot (1, 1, 1)."""
    kind: str = "eot"
    size: str = "L"                               # paper size, scaled by patch_size_for(task="detection")
    hw: Optional[Tuple[int, int]] = None          # explicit (h, w); overrides ``size``
    steps: int = 300
    batch_size: int = 4
    lr: float = 0.02
    w_class: Optional[float] = None
    w_regr: Optional[float] = None
    w_ctrness: Optional[float] = None             # FCOS centre-ness loss (ignored by RetinaNet)
    tv_weight: float = 0.1
    target_class: str = "car"                     # apricot: class of the fake object
    max_covered: float = 0.5                      # drop GT boxes covered this much by the patch
    normalize_grads: bool = True
    capture: CaptureConfig = field(default_factory=CaptureConfig.physical)
    placement: Placement = field(default_factory=Placement)
    scene: Optional[SceneConfig] = None           # physical EOT: posters on the frames' facades (labels)
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{self.kind}'")
        dc, dr, dz = _DEFAULT_WEIGHTS[self.kind]
        self.w_class = dc if self.w_class is None else float(self.w_class)
        self.w_regr = dr if self.w_regr is None else float(self.w_regr)
        self.w_ctrness = dz if self.w_ctrness is None else float(self.w_ctrness)
        if self.kind == "eot" and not self.w_class < 0:
            raise ValueError(f"the untargeted 'eot' objective needs w_class < 0 (it maximises the "
                             f"classification loss), got {self.w_class}")
        if self.kind == "apricot" and (self.w_class <= 0 or self.w_regr < 0 or self.w_ctrness < 0):
            raise ValueError("the 'apricot' objective needs w_class > 0 and w_regr, w_ctrness >= 0")
        if not 0.0 < self.max_covered <= 1.0:
            raise ValueError(f"max_covered must be in (0, 1], got {self.max_covered}")

    def patch_hw(self, input_hw: Tuple[int, int]) -> Tuple[int, int]:
        return tuple(self.hw) if self.hw is not None else patch_size_for(self.size, input_hw, task="detection")

    def weights(self) -> Dict[str, float]:
        return {"w_class": self.w_class, "w_regr": self.w_regr, "w_ctrness": self.w_ctrness,
                "tv_weight": self.tv_weight}

    def identity(self) -> str:
        """JSON of everything a resumed checkpoint must match (not steps/checkpointing)."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every"):
            d.pop(k)
        return json.dumps(d, sort_keys=True)


def target_label(model: torch.nn.Module, name: str) -> int:
    """Detection label id (1-based) of class ``name`` in ``model.class_names``."""
    names = [str(c) for c in getattr(model, "class_names", ())]
    if name not in names:
        raise ValueError(f"unknown target class '{name}'; the detector's classes are {names}")
    return names.index(name) + 1


def craft_detection_patch(model: torch.nn.Module, images_u8: torch.Tensor, targets: Sequence[Target],
                          cfg: DetectionAttackConfig, device: torch.device | str, progress: bool = True,
                          checkpoint: Optional[Path] = None, init: Optional[torch.Tensor] = None,
                          labels_u8: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[Dict]]:
    """Optimise one universal patch against detector ``model`` over ``images_u8`` (N,3,H,W) uint8 with
    per-frame GT ``targets`` (dicts with ``boxes``/``labels``); ``labels_u8`` (N,H,W) are the frames'
    segmentation labels, needed by ``cfg.scene`` to find facades. ``checkpoint`` is resumed from when it
    exists and rewritten every ``cfg.checkpoint_every`` steps and at the end. Returns (patch (3,h,w) in
    [0,1] on CPU, per-step history of the loss terms and the number of GT boxes used)."""
    if getattr(model, "task", "segmentation") != "detection":
        raise ValueError(f"{type(model).__name__} is not a detector; segmentation patches are crafted by "
                         "realtime.attacks.craft")
    _torchvision_kind(model)
    device = torch.device(device)
    n = images_u8.shape[0]
    if n == 0 or len(targets) != n:
        raise ValueError(f"need matching non-empty images/targets, got {n} and {len(targets)}")
    if cfg.scene is not None and (labels_u8 is None or labels_u8.shape[0] != n):
        raise ValueError("scene placement needs the frames' label maps (labels_u8, one per image)")
    label = target_label(model, cfg.target_class) if cfg.kind == "apricot" else 0
    hw = cfg.patch_hw(tuple(images_u8.shape[-2:]))
    patch, opt, gen, start, history = start_patch(hw, cfg.seed, cfg.lr, device, init, checkpoint, cfg.identity(),
                                                  HISTORY_KEYS)
    images = images_u8.to(device)
    scene = SceneSampler(labels_u8, cfg.scene, cfg.seed) if cfg.scene is not None else None
    was_training = model.training
    model.eval()                                        # frozen BatchNorm; grads only w.r.t. the patch
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"det-{cfg.kind}", unit="step",
               disable=not progress)
    try:
        for step in bar:
            idx = torch.randperm(n, generator=gen)[:cfg.batch_size]
            x = images[idx.to(device)].float() / 255
            if scene is not None:
                patched, mask = scene.apply(x, patch, idx.tolist(), cfg.capture, gen)
            else:
                patched, mask = apply_patch(x, patch, cfg.placement, cfg.capture, gen)
            tg = attack_targets([targets[i] for i in idx.tolist()], mask, cfg.kind, label, cfg.max_covered)
            losses = detection_losses(model, patched, tg)
            cls, regr = losses["classification"], losses["bbox_regression"]
            ctr = losses.get("bbox_ctrness", cls.new_zeros(()))
            tv = total_variation(patch) if cfg.tv_weight else cls.new_zeros(())
            terms = [(cfg.w_class, cls), (cfg.w_regr, regr), (cfg.w_ctrness, ctr), (cfg.tv_weight, tv)]
            total = sum(w * t.detach() for w, t in terms)
            opt.zero_grad(set_to_none=True)
            patch.grad = _combine(terms, patch, cfg.normalize_grads)
            opt.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
            row = {"step": step + 1, "loss": float(total), "cls": float(cls.detach()), "regr": float(regr.detach()),
                   "ctrness": float(ctr.detach()), "tv": float(tv.detach()),
                   "gt": float(sum(len(t["labels"]) for t in tg))}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", cls=f"{row['cls']:.3f}", regr=f"{row['regr']:.3f}")
            done = step + 1
            if checkpoint is not None and (done % max(1, cfg.checkpoint_every) == 0 or done == cfg.steps):
                save_checkpoint(Path(checkpoint), cfg.identity(), patch, opt, gen, done, history, HISTORY_KEYS)
    finally:
        model.train(was_training)
    return patch.detach().cpu(), history


__all__ = ["DetectionAttackConfig", "KINDS", "attack_targets", "covered_fraction", "craft_detection_patch",
           "detection_losses", "mask_bbox", "target_label"]
