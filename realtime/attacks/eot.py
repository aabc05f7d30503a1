"""Universal EOT adversarial patch against a segmentation model (zmask.md section 5).

Objective per step, on a random mini-batch of training frames with a random placement and capture
transform (expectation over transformations); with ``scene`` set the placement is physical instead:
posters on each frame's facades in perspective, occluded by its foreground objects (``.scene``):

    total = beta * L_adv + (1 - beta) * L_extra + tv_weight * TV + nps_weight * NPS

With ``normalize_grads`` (default, as the paper) each term's gradient w.r.t. the patch is first scaled to
unit L2 norm, so the weights set the direction mix and not the raw loss scales. The patch is optimised
with Adam directly in pixel space and projected (clamped) back into [0, 1] after every step.

``L_adv`` (untargeted, "stop pushing already-wrong pixels"): minus the cross-entropy summed over pixels
that are still predicted as their true class, divided by the number of valid pixels (void and pixels under
the patch are excluded from both). A pixel stops contributing once it is misclassified, so the budget
goes to pixels that are still right. ``loss='ce'`` is plain -CE over all valid pixels.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from realtime.data import IGNORE_INDEX
from realtime.core.devices import autocast

from .apply import CaptureConfig, Placement, apply_patch, patch_size_for
from .scene import SceneConfig, SceneSampler

ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
HISTORY_KEYS: Tuple[str, ...] = ("loss", "adv", "extra", "tv", "nps", "acc")


def default_palette() -> Tuple[Tuple[float, float, float], ...]:
    """27 colours on a 3-level RGB grid inside a printer's gamut: a stand-in until a printed colour chart
    is measured (replace with the measured colours for a real print)."""
    levels = (0.1, 0.5, 0.9)
    return tuple(itertools.product(levels, levels, levels))


@dataclass
class EOTConfig:
    """Settings of one universal patch optimisation (see the module docstring for the objective)."""
    size: str = "L"                               # paper size name, scaled to the frame (patch_size_for)
    hw: Optional[Tuple[int, int]] = None          # explicit (h, w); overrides ``size``
    steps: int = 2000
    batch_size: int = 8
    lr: float = 0.01                              # Adam in clipped pixel space
    tv_weight: float = 0.1
    nps_weight: float = 0.0                       # 0 = off
    palette: Tuple[Tuple[float, float, float], ...] = field(default_factory=default_palette)
    normalize_grads: bool = True
    loss: str = "untargeted"                      # 'untargeted' (stop pushing wrong pixels) or 'ce'
    beta: float = 1.0                             # weight of L_adv vs the extra_loss hook (1 - beta)
    capture: CaptureConfig = field(default_factory=CaptureConfig.physical)
    placement: Placement = field(default_factory=Placement)
    scene: Optional[SceneConfig] = None           # physical EOT: posters on the frames' facades (labels)
    seed: int = 0
    checkpoint_every: int = 50
    amp: bool = False                             # bf16 autocast for the model on CUDA

    def __post_init__(self) -> None:
        if self.loss not in ("untargeted", "ce"):
            raise ValueError(f"loss must be 'untargeted' or 'ce', got '{self.loss}'")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")

    def patch_hw(self, input_hw: Tuple[int, int]) -> Tuple[int, int]:
        return tuple(self.hw) if self.hw is not None else patch_size_for(self.size, input_hw)

    def identity(self) -> str:
        """JSON of everything that must match for a checkpoint to be resumed (not steps/checkpointing)."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every"):
            d.pop(k)
        return json.dumps(d, sort_keys=True)


def adversarial_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     variant: str = "untargeted", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """L_adv (to minimise): -sum of CE over counted pixels / number of valid pixels.

    Valid = not void and not under the patch (``mask`` (N,1,H,W) > 0.5). 'untargeted' counts only valid
    pixels still predicted as their label; 'ce' counts every valid pixel.
    """
    n_cls = logits.shape[1]
    labels = labels.long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < n_cls) & (mask[:, 0] < 0.5)
    ce = F.cross_entropy(logits.float(), labels.clamp(0, n_cls - 1), reduction="none")
    keep = valid & (logits.argmax(1) == labels) if variant == "untargeted" else valid
    return -(ce * keep).sum() / valid.sum().clamp(min=1)


def accuracy_outside(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of valid pixels outside the patch still classified correctly (progress readout)."""
    labels = labels.long()
    valid = (labels != ignore_index) & (labels < logits.shape[1]) & (mask[:, 0] < 0.5)
    return float(((logits.argmax(1) == labels) & valid).sum() / valid.sum().clamp(min=1))


def total_variation(patch: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean |horizontal difference| + mean |vertical difference| of the (3,h,w) patch."""
    return ((patch[:, :, 1:] - patch[:, :, :-1]).abs().mean() + (patch[:, 1:, :] - patch[:, :-1, :]).abs().mean())


def non_printability(patch: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Sharif et al. NPS: mean over pixels of the product of distances to the K palette colours (K,3);
    zero exactly where a pixel is a printable colour."""
    px = patch.reshape(3, -1).t()                                        # (P,3)
    d = ((px[:, None, :] - palette.to(px)[None]) ** 2).sum(-1).add(1e-12).sqrt()
    return d.prod(1).mean()


def _combine(terms: List[Tuple[float, torch.Tensor]], patch: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Weighted gradient of the terms w.r.t. ``patch``; each term's gradient unit-L2 first if ``normalize``."""
    grad = torch.zeros_like(patch)
    active = [(w, t) for w, t in terms if w != 0 and t.requires_grad]
    for i, (w, t) in enumerate(active):
        g, = torch.autograd.grad(t, patch, retain_graph=i < len(active) - 1, allow_unused=True)
        if g is None:
            continue
        if normalize:
            g = g / g.norm().clamp(min=1e-12)
        grad = grad + w * g
    return grad


def load_checkpoint(path: Path, identity: str, patch: torch.Tensor, opt: torch.optim.Optimizer,
                    gen: torch.Generator, keys: Tuple[str, ...] = HISTORY_KEYS) -> Tuple[int, List[Dict]]:
    """Restore a crafting run (patch, optimiser, generator, history) saved under the same ``identity``;
    shared by every universal-patch crafter (segmentation here, detectors in ``.detection``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != identity:
        raise ValueError(f"checkpoint {path} was made with a different attack configuration; "
                         "delete it or restore the original settings")
    with torch.no_grad():
        patch.copy_(state["patch"].to(patch))
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    rows = state["history"].tolist()
    return int(state["step"]), [dict(zip(("step",) + keys, [int(r[0])] + r[1:])) for r in rows]


def save_checkpoint(path: Path, identity: str, patch: torch.Tensor, opt: torch.optim.Optimizer,
                    gen: torch.Generator, step: int, history: List[Dict], keys: Tuple[str, ...] = HISTORY_KEYS
                    ) -> None:
    """Write a crafting run's state as plain tensors (``weights_only`` loadable), atomically."""
    rows = [[float(h["step"])] + [float(h[k]) for k in keys] for h in history]
    state = {"patch": patch.detach().cpu(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "step": step, "config": identity,
             "history": torch.tensor(rows, dtype=torch.float64).view(-1, 1 + len(keys))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)                                                    # atomic: never a half-written file


def start_patch(hw: Tuple[int, int], seed: int, lr: float, device: torch.device, init: Optional[torch.Tensor],
                checkpoint: Optional[Path], identity: str, keys: Tuple[str, ...] = HISTORY_KEYS
                ) -> Tuple[torch.Tensor, torch.optim.Optimizer, torch.Generator, int, List[Dict]]:
    """The optimised patch (seeded noise, or ``init``), its Adam optimiser and the run's generator, resumed
    from ``checkpoint`` when that file exists: ``(patch, opt, gen, start step, history)``."""
    gen = torch.Generator().manual_seed(seed)
    patch = torch.rand(3, *hw, generator=gen)
    if init is not None:
        if tuple(init.shape) != (3, *hw):
            raise ValueError(f"init patch has shape {tuple(init.shape)}, expected (3, {hw[0]}, {hw[1]})")
        patch = init.detach().float().clamp(0, 1).clone()
    patch = patch.to(device).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        start, history = load_checkpoint(Path(checkpoint), identity, patch, opt, gen, keys)
    return patch, opt, gen, start, history


def craft_universal_patch(model: torch.nn.Module, images_u8: torch.Tensor, labels_u8: torch.Tensor,
                          cfg: EOTConfig, device: torch.device | str, progress: bool = True,
                          checkpoint: Optional[Path] = None, extra_loss: Optional[ExtraLoss] = None,
                          init: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[Dict]]:
    """Optimise one universal patch over ``images_u8`` (N,3,H,W) / ``labels_u8`` (N,H,W).

    ``extra_loss(patched, mask, logits) -> scalar`` enters with weight ``1 - beta`` (beta-controlled and
    defense-aware attacks). ``checkpoint``: resumed from when it exists, rewritten every
    ``cfg.checkpoint_every`` steps and at the end. ``init`` (3,h,w) in [0,1]: start from this patch
    instead of noise (warm-starting a defense-aware attack from a crafted EOT patch). Returns (patch (3,h,w) in [0,1] on CPU, per-step history).
    """
    if extra_loss is None and cfg.beta != 1.0:
        raise ValueError("beta < 1 weights an extra loss, but no extra_loss was given")
    device = torch.device(device)
    n = images_u8.shape[0]
    if n == 0 or labels_u8.shape[0] != n:
        raise ValueError(f"need matching non-empty images/labels, got {n} and {labels_u8.shape[0]}")
    hw = cfg.patch_hw(tuple(images_u8.shape[-2:]))
    patch, opt, gen, start, history = start_patch(hw, cfg.seed, cfg.lr, device, init, checkpoint, cfg.identity())
    images, labels = images_u8.to(device), labels_u8.to(device)
    palette = torch.tensor(cfg.palette, dtype=torch.float32, device=device)
    scene = SceneSampler(labels_u8, cfg.scene, cfg.seed) if cfg.scene is not None else None
    was_training = model.training
    model.eval()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="eot", unit="step",
               disable=not progress)
    try:
        for step in bar:
            idx = torch.randperm(n, generator=gen)[:cfg.batch_size].to(device)
            x, y = images[idx].float() / 255, labels[idx].long()
            if scene is not None:
                patched, mask = scene.apply(x, patch, idx.tolist(), cfg.capture, gen)
            else:
                patched, mask = apply_patch(x, patch, cfg.placement, cfg.capture, gen)
            with autocast(device, cfg.amp):
                logits = model(patched)
            logits = logits.float()
            adv = adversarial_loss(logits, y, mask, cfg.loss)
            extra = extra_loss(patched, mask, logits) if extra_loss is not None else adv.new_zeros(())
            tv = total_variation(patch) if cfg.tv_weight else adv.new_zeros(())
            nps = non_printability(patch, palette) if cfg.nps_weight else adv.new_zeros(())
            terms = [(cfg.beta, adv), (1 - cfg.beta, extra), (cfg.tv_weight, tv), (cfg.nps_weight, nps)]
            total = sum(w * t.detach() for w, t in terms)
            opt.zero_grad(set_to_none=True)
            patch.grad = _combine(terms, patch, cfg.normalize_grads)
            opt.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
            row = {"step": step + 1, "loss": float(total), "adv": float(adv.detach()), "extra": float(extra.detach()),
                   "tv": float(tv.detach()), "nps": float(nps.detach()), "acc": accuracy_outside(logits.detach(), y, mask)}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['acc']:.3f}")
            done = step + 1
            if checkpoint is not None and (done % max(1, cfg.checkpoint_every) == 0 or done == cfg.steps):
                save_checkpoint(Path(checkpoint), cfg.identity(), patch, opt, gen, done, history)
    finally:
        model.train(was_training)
    return patch.detach().cpu(), history
