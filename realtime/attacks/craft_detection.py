"""Craft a universal adversarial patch against a detector (or a random control patch).

Examples:
    python -m realtime.attacks.craft_detection --model fcos_ddrnet --kind eot --size L
    python -m realtime.attacks.craft_detection --model fcos_ddrnet --kind apricot --size M --target-class car
    python -m realtime.attacks.craft_detection --model fcos_ddrnet --kind random --size L
    python -m realtime.attacks.craft_detection --model fcos_ddrnet --kind eot --size L --resume
    python -m realtime.attacks.craft_detection --model fcos_ddrnet --kind eot --placement scene \
        --init realtime/attacks/library/fcos_ddrnet_eot_L.png          # physical EOT -> ..._physeot_L.png

Writes ``<out-dir>/<model>_<kind>_<size>.png`` (``_phys<kind>_`` with ``--placement scene``) + JSON sidecar (model, weights, fingerprint, task, kind,
size, objective weights, hw, frame_hw, steps, final losses, frames, seconds, env, config, history).
A checkpoint ``<model>_<kind>_<size>.ckpt.pt`` is kept next to it while crafting; ``--resume`` continues
from it. Segmentation models are crafted by ``python -m realtime.attacks.craft``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from realtime.core.cli import USER_ERRORS, report_error
from realtime.data.detection import CamVidDetection, boxes_from_label
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models

from .apply import DETECTION_PATCH_SIDES_480, CaptureConfig, Placement, load_patch_png, random_patch, save_patch_png
from .detection import DetectionAttackConfig, craft_detection_patch
from .scene import SceneConfig

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "library"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m realtime.attacks.craft_detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"a detector: {', '.join(list_models('detection'))}")
    p.add_argument("--kind", choices=("eot", "apricot", "random"), default="eot",
                   help="eot: class-untargeted (w_class < 0); apricot: false detection at the patch; "
                        "random: uniform-noise control (no optimisation)")
    p.add_argument("--size", default="L", help=f"paper size {sorted(DETECTION_PATCH_SIDES_480)} scaled to the frame")
    p.add_argument("--weights", default="default",
                   help="checkpoint path, 'default' for the shipped weights, 'none' for the untrained model")
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="train", help="frames the patch is optimised on")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where <model>_<kind>_<size>.png goes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02, help="Adam step in [0,1] pixel units")
    p.add_argument("--w-class", type=float, default=None, help="default: -1 (eot), 1 (apricot)")
    p.add_argument("--w-regr", type=float, default=None, help="default: 0.1 (eot), 1 (apricot)")
    p.add_argument("--w-ctrness", type=float, default=None, help="FCOS centre-ness; default: 0 (eot), 1 (apricot)")
    p.add_argument("--tv-weight", type=float, default=0.1)
    p.add_argument("--target-class", default="car", help="apricot: class of the fake object")
    p.add_argument("--max-covered", type=float, default=0.5, help="drop GT boxes this much covered by the patch")
    p.add_argument("--capture", choices=("physical", "none"), default="physical", help="EOT capture preset")
    p.add_argument("--placement", choices=("random", "scene"), default="random",
                   help="random: axis-aligned anywhere (digital EOT); scene: posters on the frames' facades in "
                        "perspective, occluded by foreground objects (physical EOT, the physical benchmark's renderer)")
    p.add_argument("--init", default=None, help="start from this patch PNG (same size) instead of noise")
    p.add_argument("--no-grad-norm", action="store_true", help="do not normalise each loss's gradient")
    p.add_argument("--limit", type=int, default=None, help="only the first N frames of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def output_path(out_dir: str | Path, model: str, kind: str, size: str, placement: str = "random") -> Path:
    prefix = "phys" if placement == "scene" else ""
    return Path(out_dir) / f"{model}_{prefix}{kind}_{size.upper()}.png"


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.stem + ".ckpt.pt")


def load_frames(ds: CamVidDetection, limit: Optional[int], progress: bool):
    """(uint8 (N,3,H,W), [targets], uint8 labels (N,H,W)) of the first ``limit`` frames (all when None)."""
    n = min(len(ds), limit) if limit else len(ds)
    images, labels = ds.seg.to_tensors(range(n), progress=progress)
    targets = []
    for lab in labels:
        boxes, labs = boxes_from_label(lab.long().numpy(), ds.cfg)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labs)})
    return images, targets, labels


def _check_detector(name: str) -> None:
    if name in list_models("detection"):
        return
    if name in list_models("segmentation"):
        raise ValueError(f"'{name}' is a segmentation model; craft its patches with "
                         f"python -m realtime.attacks.craft --model {name}")
    raise KeyError(f"unknown detector '{name}'; available: {', '.join(list_models('detection'))}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    size = args.size.upper()
    try:
        _check_detector(args.model)
        if size not in DETECTION_PATCH_SIDES_480:
            raise KeyError(f"unknown patch size '{args.size}'; choose from {sorted(DETECTION_PATCH_SIDES_480)}")
        cfg = None
        if args.kind != "random":
            cfg = DetectionAttackConfig(
                kind=args.kind, size=size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                w_class=args.w_class, w_regr=args.w_regr, w_ctrness=args.w_ctrness, tv_weight=args.tv_weight,
                target_class=args.target_class, max_covered=args.max_covered, normalize_grads=not args.no_grad_norm,
                capture=CaptureConfig.physical() if args.capture == "physical" else CaptureConfig.none(),
                placement=Placement("random"), scene=SceneConfig() if args.placement == "scene" else None,
                seed=args.seed, checkpoint_every=args.checkpoint_every)
        if args.kind == "random" and (args.placement != "random" or args.init):
            raise ValueError("--placement scene and --init apply to crafted patches, not to --kind random")
        if args.init and not Path(args.init).is_file():
            raise FileNotFoundError(f"--init patch {args.init} not found")
        ds = CamVidDetection(args.data, args.split)
        dev = pick_device(args.device)
        weights = None if str(args.weights).lower() == "none" else args.weights
        model = build_model(args.model, weights=weights, device=dev)
        if getattr(model, "task", "segmentation") != "detection":
            raise ValueError(f"'{args.model}' is not a detector; use python -m realtime.attacks.craft")
        if cfg is not None and cfg.kind == "apricot":
            from .detection import target_label
            target_label(model, cfg.target_class)
    except USER_ERRORS as exc:
        return report_error(exc)
    out = output_path(args.out_dir, args.model, args.kind, size, args.placement)
    meta = {"model": args.model, "weights": str(args.weights), "fingerprint": fingerprint(model), "task": "detection",
            "size": size, "kind": args.kind, "seed": args.seed, "split": args.split, "data": str(ds.seg.root)}
    if cfg is None:
        frame_hw = tuple(ds.seg.load(0)[0].shape[:2])
        hw = DetectionAttackConfig(size=size).patch_hw(frame_hw)
        patch = random_patch(hw, torch.Generator().manual_seed(args.seed))
        meta.update(hw=list(hw), frame_hw=list(frame_hw), steps=0, final_loss=None, env=describe(dev))
        save_patch_png(patch, out, meta)
        print(f"wrote random {hw[0]}x{hw[1]} control patch to {out}")
        return 0
    images, targets, labels = load_frames(ds, args.limit, progress=not args.quiet)
    ckpt = checkpoint_path(out)
    if ckpt.exists() and not args.resume:
        ckpt.unlink()                                                    # a fresh run starts from scratch
    t0 = time.time()
    try:
        init = None
        if args.init:
            init = load_patch_png(args.init)[0]
            meta.update(init=str(args.init))
        patch, history = craft_detection_patch(model, images, targets, cfg, dev, progress=not args.quiet,
                                               checkpoint=ckpt, init=init, labels_u8=labels)
    except (ValueError, NotImplementedError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tail = history[-min(len(history), 20):]
    final = {k: sum(h[k] for h in tail) / max(len(tail), 1) for k in ("loss", "cls", "regr", "ctrness", "tv")}
    if cfg.kind == "apricot":
        meta["target_class"] = cfg.target_class
    meta.update(placement=args.placement, objective=cfg.weights(), hw=list(patch.shape[1:]), frame_hw=list(images.shape[-2:]),
                steps=cfg.steps, final_loss=final["loss"], final_class_loss=final["cls"],
                final_regr_loss=final["regr"], final_ctrness_loss=final["ctrness"], final_tv=final["tv"],
                frames=len(images), seconds=round(time.time() - t0, 1), env=describe(dev), config=asdict(cfg),
                history=[{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                         for h in history[::max(1, len(history) // 200)]])
    save_patch_png(patch, out, meta)
    print(f"wrote {patch.shape[1]}x{patch.shape[2]} {cfg.kind} patch to {out} (final loss {final['loss']:.4f}: "
          f"cls {final['cls']:.4f}, regr {final['regr']:.4f}; checkpoint {ckpt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
