"""Craft a universal EOT adversarial patch (or a random control patch) for a registered model.

Examples:
    python -m realtime.attacks.craft --model ddrnet23_slim --size L --out patches/ddrnet_L.png
    python -m realtime.attacks.craft --model bisenetv1 --size M --steps 3000 --batch-size 16 --out p.png --resume
    python -m realtime.attacks.craft --model ddrnet23_slim --size L --random --out patches/random_L.png

Writes PNG + JSON sidecar (model, fingerprint, size, hw, steps, final loss, seed, config). A checkpoint
``<out>.ckpt.pt`` is kept while crafting; ``--resume`` continues from it after an interruption.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from realtime.core.cli import USER_ERRORS, parse_hw, report_error
from realtime.data import CamVid
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models, model_arg, model_task

from .apply import PATCH_SIZES_1024x2048, CaptureConfig, Placement, load_patch_png, random_patch, save_patch_png
from .eot import EOTConfig, craft_universal_patch
from .scene import SceneConfig


def _patch_hw(text: str) -> Tuple[int, int]:
    """'105x141' -> (105, 141), as an argparse type."""
    try:
        return parse_hw(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m realtime.attacks.craft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(list_models('segmentation'))}, or torchvision:NAME / package.module:factory")
    p.add_argument("--weights", default="default", help="checkpoint path, or 'default' for the shipped weights")
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="train", help="frames the patch is optimised on")
    p.add_argument("--size", default="L", help=f"paper size {sorted(PATCH_SIZES_1024x2048)} scaled to the frame")
    p.add_argument("--hw", type=_patch_hw, default=None, help="explicit patch HxW (overrides --size)")
    p.add_argument("--out", required=True, help="output PNG (JSON sidecar written next to it)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01, help="Adam step in [0,1] pixel units")
    p.add_argument("--tv-weight", type=float, default=0.1)
    p.add_argument("--nps-weight", type=float, default=0.0)
    p.add_argument("--loss", choices=("untargeted", "ce"), default="untargeted")
    p.add_argument("--capture", choices=("physical", "none"), default="physical", help="EOT capture preset")
    p.add_argument("--placement", choices=("random", "scene"), default="random",
                   help="random: axis-aligned anywhere (digital EOT); scene: posters on the frames' facades in "
                        "perspective, occluded by foreground objects (physical EOT, through the demo's renderer)")
    p.add_argument("--no-grad-norm", action="store_true", help="do not normalise each loss's gradient")
    p.add_argument("--limit", type=int, default=None, help="only the first N frames of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model on GPU")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--random", action="store_true", help="write a uniform-noise control patch instead")
    p.add_argument("--beta", type=float, default=None,
                   help="beta-controlled patch: minimise (1-beta) L_OZ + beta L_adv (needs --calibration)")
    p.add_argument("--defense-aware", choices=("mask", "flag"), default=None,
                   help="Adv-Mask / Adv-Flag against Z-Mask with weight --alpha on L_adv (needs --calibration)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--calibration", default=None, help="Z-Mask artifact: statistics, layers, fusion, lambda0")
    p.add_argument("--init", default=None, help="start from this patch PNG (same size) instead of noise")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt.pt if present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def adaptive_objective(args: argparse.Namespace, model: torch.nn.Module):
    """(model wrapped with taps, extra loss, weight of L_adv) for --beta / --defense-aware."""
    from realtime.defenses.artifact import load_calibration
    from realtime.attacks.adaptive import DefenseAwareLoss, OverActivationLoss, TappedForward
    if args.calibration is None:
        raise ValueError("--beta and --defense-aware need --calibration (Z-Mask statistics and layers)")
    cal = load_calibration(args.calibration, model)
    dev = next(model.parameters()).device
    if args.defense_aware:
        zm = cal.build_zmask(model)
        tapped = TappedForward(model, cal.config.layers)
        return tapped, DefenseAwareLoss(tapped, zm, args.defense_aware), args.alpha
    tapped = TappedForward(model, cal.config.shallow)
    stats = cal.stats.to(dev)
    return tapped, OverActivationLoss(tapped, cal.config.shallow, stats.mu, stats.sigma, cal.config.spr), args.beta


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.stem + ".ckpt.pt")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        model_arg(args.model)           # a registered name or an external spec (torchvision:NAME, pkg.mod:factory)
        if args.hw is None and args.size.upper() not in PATCH_SIZES_1024x2048:
            raise KeyError(f"unknown patch size '{args.size}'; choose from {sorted(PATCH_SIZES_1024x2048)}")
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out must be a .png file, got {out}")
        ds = CamVid(args.data, args.split)
        dev = pick_device(args.device)
        model = build_model(args.model, weights=args.weights, device=dev)
        if model_task(model) != "segmentation":
            raise ValueError(f"{args.model} is a detector; craft with python -m realtime.attacks.craft_detection")
    except USER_ERRORS as exc:
        return report_error(exc)
    cfg = EOTConfig(size=args.size.upper(), hw=args.hw, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    tv_weight=args.tv_weight, nps_weight=args.nps_weight, normalize_grads=not args.no_grad_norm,
                    loss=args.loss, capture=CaptureConfig.physical() if args.capture == "physical"
                    else CaptureConfig.none(), placement=Placement("random"), seed=args.seed,
                    scene=SceneConfig() if args.placement == "scene" else None,
                    checkpoint_every=args.checkpoint_every, amp=args.amp)
    meta = {"model": args.model, "weights": str(args.weights), "fingerprint": fingerprint(model),
            "size": cfg.size if args.hw is None else "custom", "seed": args.seed, "split": args.split,
            "data": str(ds.root)}
    if args.random:
        frame_hw = tuple(ds.load(0)[0].shape[:2])
        hw = cfg.patch_hw(frame_hw)
        patch = random_patch(hw, torch.Generator().manual_seed(args.seed))
        meta.update(kind="random", hw=list(hw), frame_hw=list(frame_hw), steps=0, final_loss=None)
        save_patch_png(patch, out, meta)
        print(f"wrote random {hw[0]}x{hw[1]} control patch to {out}")
        return 0
    idx = range(min(len(ds), args.limit)) if args.limit else None
    images, labels = ds.to_tensors(idx, progress=not args.quiet)
    ckpt = checkpoint_path(out)
    if ckpt.exists() and not args.resume:
        ckpt.unlink()                                                    # a fresh run starts from scratch
    t0 = time.time()
    try:
        target, extra = model, None
        if args.beta is not None or args.defense_aware:
            target, extra, weight = adaptive_objective(args, model)
            cfg.beta = weight
            meta.update(beta=args.beta, defense_aware=args.defense_aware,
                        alpha=args.alpha if args.defense_aware else None, calibration=str(args.calibration))
        init = None
        if args.init:
            init = load_patch_png(args.init)[0]
            meta.update(init=str(args.init))
        patch, history = craft_universal_patch(target, images, labels, cfg, dev, progress=not args.quiet,
                                               checkpoint=ckpt, extra_loss=extra, init=init)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tail = history[-min(len(history), 20):]
    final = {k: sum(h[k] for h in tail) / max(len(tail), 1) for k in ("loss", "adv", "acc")}
    meta.update(placement=args.placement)
    kind = ("eot-physical" if args.placement == "scene" else "eot") if extra is None else ("beta" if args.beta is not None else f"adv-{args.defense_aware}")
    meta.update(kind=kind, hw=list(patch.shape[1:]), frame_hw=list(images.shape[-2:]), steps=cfg.steps,
                final_loss=final["loss"], final_adv_loss=final["adv"], final_train_accuracy_outside=final["acc"],
                frames=len(images), seconds=round(time.time() - t0, 1), env=describe(dev), config=asdict(cfg),
                history=[{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                         for h in history[::max(1, len(history) // 200)]])
    save_patch_png(patch, out, meta)
    print(f"wrote {patch.shape[1]}x{patch.shape[2]} patch to {out} (final loss {final['loss']:.4f}, "
          f"train accuracy outside patch {final['acc']:.3f}, checkpoint {ckpt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
