"""Calibrate Z-Mask for a model on clean frames: CamVid train frames, or your own unlabeled footage.

    python -m calibration.fit --model ddrnet23_slim --out calibration/shipped/ddrnet23_slim.safetensors
    python -m calibration.fit --model torchvision:lraspp_mobilenet_v3_large --weights my.pt \
        --frames drive.mp4 --max-frames 300 --craft-steps 200 --time-budget 1200 --out my.safetensors

With ``--frames SRC`` (anything ``realtime.run --source`` accepts) no labels are read: mu/sigma come
from those frames, and the patches for step 2 are crafted against the model's own predictions on them
(``calibration.footage``: universal EOT S/M/L, axis-aligned with the physical-capture simulation),
plus the random-noise patches and half-contrast twins of the ``simple`` set. ``--sources craft`` runs the
same crafting against the CamVid labels: a labelled calibration that is not fitted on the library patches
a benchmark then tests with.

1. per-channel mu/sigma of every candidate layer on clean frames (streaming pooled estimator);
2. a patched twin of each calibration frame, placed at random with the physical-capture simulation:
   the beta set (library EOT S/M/L and beta >= 0.5 patches) when it exists, else random-noise S/M/L
   and EOT patches at full and half contrast (``--sources``);
3. layer ranking (detection AUC + localisation IoU) and the S/D choice (``--layers auto``), or the
   paper's sets (``--layers paper``), or an explicit ``--shallow a,b --deep c``;
4. the 8-scalar fusion block trained with BCE against the true patch masks;
5. lambda0 from the ROC of d (default: <= 1 % false positives on the clean calibration frames);
6. one artifact (safetensors + JSON header) and PNG/markdown reports under ``--report-dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from realtime.defenses.artifact import Calibration
from calibration.collect import channel_stats, layer_heatmaps
from calibration.footage import FootageConfig, craft_patches, pseudo_labels, read_footage
from calibration.grow import choose_grow
from calibration.fusion_train import MASK_THRESHOLDS, best_mask_threshold, scores, train_fusion
from calibration.patched_set import library_patches, make_sources, patch_frames
from calibration.plots import plot_heatmaps, plot_roc
from calibration.roc import roc_report
from calibration.select_layers import mask_to_work, pick_layers, rank_layers, ranking_markdown
from realtime.core.cli import parse_hw, run_job, write_json
from realtime.attacks import CaptureConfig
from realtime.attacks.scene import SceneSampler
from realtime.data import CamVid
from realtime.defenses import ChannelStats, SPRConfig, ZMask, ZMaskConfig, aggregate
from realtime.core.devices import describe, pick_device
from realtime.models import build_model, fingerprint, list_models, model_arg, model_slug
from realtime.models.registry import model_task

LIBRARY = Path(__file__).resolve().parents[1] / "realtime" / "attacks" / "library"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calibration.fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=model_arg,
                   help="a registered name ({}) or torchvision:NAME / package.module:factory".format(", ".join(list_models())))
    p.add_argument("--weights", default="default")
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--split", default="train", help="calibration frames come from this split")
    p.add_argument("--out", default=None, help="artifact path (default calibration/shipped/<model>.safetensors)")
    p.add_argument("--report-dir", default=None, help="default benchmarks/results/calibration/<model>")
    p.add_argument("--stats-frames", type=int, default=None, help="clean frames for mu/sigma (default: all)")
    p.add_argument("--fit-frames", type=int, default=160, help="frames used (clean + patched twin) for the block")
    p.add_argument("--layers", default="auto", choices=["auto", "paper"])
    p.add_argument("--shallow", default=None, help="comma-separated module names (overrides --layers)")
    p.add_argument("--deep", default=None)
    p.add_argument("--n-shallow", type=int, default=3)
    p.add_argument("--n-deep", type=int, default=2)
    p.add_argument("--mode", default="same", choices=["same", "demo"], help="SPR alignment")
    p.add_argument("--work-scale", type=float, default=1.0,
                   help="scale the paper's SPR working grid and kernels (0.5: a detector whose hooked maps are all "
                        "<= 1/8 of the input loses nothing at half the paper's grid and costs 4x less)")
    p.add_argument("--patches", default=str(LIBRARY), help="folder of crafted patch PNGs (+JSON sidecars)")
    p.add_argument("--sources", default="auto", choices=["auto", "beta", "simple", "crafted", "craft"],
                   help="patches for the block: beta set (EOT + beta >= 0.5), simple (noise + EOT), crafted (EOT at "
                        "full and half contrast, no noise), auto = beta if any; craft = EOT S/M/L crafted here "
                        "against the split's labels (--craft-*), so the patches a benchmark tests with are not the "
                        "ones the block was fitted on (always the case with --frames, against the model's predictions)")
    p.add_argument("--frames", default=None,
                   help="unlabeled calibration footage: video, folder, glob, cameraN or URL (replaces --data/--split)")
    p.add_argument("--max-frames", type=int, default=400, help="--frames: frames kept")
    p.add_argument("--every", type=int, default=1, help="--frames: keep every k-th frame")
    p.add_argument("--imgsz", type=parse_hw, default=(360, 480), help="--frames: model input HxW")
    p.add_argument("--craft-steps", type=int, default=200,
                   help="--frames / --sources craft: EOT steps per patch crafted here (0: none)")
    p.add_argument("--craft-sizes", default="S,M,L", help="--frames / --sources craft: patch sizes to craft")
    p.add_argument("--craft-batch", type=int, default=4, help="--frames / --sources craft: frames per crafting step")
    p.add_argument("--time-budget", type=float, default=None,
                   help="--frames / --sources craft: seconds for all the crafting")
    p.add_argument("--placement", default="random", choices=["random", "scene", "mixed"],
                   help="patched calibration twins: random (axis-aligned anywhere), scene (posters on the frames' "
                        "facades in perspective with occlusion, as a camera sees a print; labels, or the model's own "
                        "predictions with --frames), mixed (every other frame each)")
    p.add_argument("--max-fpr", type=float, default=0.01)
    p.add_argument("--mask-threshold", default="0.5",
                   help="threshold on the soft mask M~ (paper: 0.5), or 'auto': the best pooled IoU with the true "
                        "patch masks on the patched calibration frames")
    p.add_argument("--grow", default="off", choices=["off", "auto"],
                   help="mask growing on flagged frames (ZMaskConfig.grow_threshold): auto = the clean-frame "
                        "quantile of the fine shallow map with the best mask IoU on the flagged patched twins")
    p.add_argument("--fusion-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def training_sources(args: argparse.Namespace, hw, fp: str, task: str = "segmentation"):
    """The patched-frame sources for the block: the beta set when the library has one, else 'simple'."""
    lib = Path(args.patches) if args.patches else None
    if args.sources in ("auto", "beta") and lib is not None:
        beta = library_patches(lib, args.model, fp, kinds=("eot", "beta"), min_beta=0.5)
        if any("beta" in name for name, _ in beta):
            return make_sources(hw, beta, seed=args.seed, half_contrast=False, include_random=False, task=task)
        if args.sources == "beta":
            raise FileNotFoundError(f"no beta-controlled patches for {args.model} in {lib}")
    crafted = library_patches(lib, args.model, fp, kinds=("eot",)) if lib is not None else []
    if args.sources == "crafted" and not crafted:
        raise FileNotFoundError(f"no EOT patches for {args.model} (fingerprint {fp}) in {lib}")
    return make_sources(hw, crafted, seed=args.seed, task=task, include_random=args.sources != "crafted")


def calibration_frames(args: argparse.Namespace) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(uint8 frames, their labels or None, where they came from): the unlabeled ``--frames`` footage,
    else the CamVid split."""
    if args.frames:
        images = read_footage(FootageConfig(args.frames, max_frames=args.max_frames, every=args.every,
                                            size=tuple(args.imgsz)))
        return images[: args.stats_frames or len(images)], None, f"footage {args.frames} (no labels)"
    ds = CamVid(args.data, args.split)
    images, labels = ds.to_tensors(range(min(len(ds), args.stats_frames or len(ds))), progress=True)
    return images, labels, f"CamVid {args.split}"


def scene_sampler(args: argparse.Namespace, model: torch.nn.Module, frames: torch.Tensor,
                  labels: Optional[torch.Tensor]) -> Optional[SceneSampler]:
    """Facade posters for the patched twins (``--placement scene|mixed``): on the labels, or on the
    model's own predictions when the footage has none."""
    if args.placement == "random":
        return None
    if labels is None:
        labels = pseudo_labels(model, frames, args.batch_size)
    return SceneSampler(labels, seed=args.seed)


def crafted_sources(args: argparse.Namespace, model: torch.nn.Module, images: torch.Tensor,
                    labels: Optional[torch.Tensor], hw, fp: str, task: str):
    """Patches crafted here (plus noise and half contrast): against the labels, or against the model's own
    predictions when the frames have none (``--frames``)."""
    if task != "segmentation" or args.craft_steps <= 0:
        if args.sources == "craft":
            raise ValueError("--sources craft needs a segmenter and --craft-steps > 0")
        return training_sources(args, hw, fp, task), []
    dev = next(model.parameters()).device
    prefix = "label-eot" if labels is not None else "pseudo-eot"
    if labels is None:
        labels = pseudo_labels(model, images, args.batch_size)
    sizes = [s.strip().upper() for s in args.craft_sizes.split(",") if s.strip()]
    crafted = craft_patches(model, images, labels, sizes, args.craft_steps, dev, seed=args.seed,
                            time_budget=args.time_budget, batch_size=args.craft_batch, prefix=prefix)
    sources = make_sources(hw, [(n, p) for n, p, _s in crafted], seed=args.seed, task=task)
    return sources, [{"name": n, "hw": list(p.shape[1:]), "steps": s} for n, p, s in crafted]


def fit(args: argparse.Namespace) -> dict:
    t0 = time.time()
    dev = pick_device(args.device)
    model = build_model(args.model, weights=args.weights, device=dev)
    fp = fingerprint(model)
    spec = model.layers()
    images, labels, origin = calibration_frames(args)
    h, w = images.shape[-2:]
    task = model_task(model)
    if not 0 < args.work_scale <= 1:
        raise ValueError(f"--work-scale must be in (0, 1], got {args.work_scale}")
    spr = SPRConfig.for_input(max(1, round(h * args.work_scale)), max(1, round(w * args.work_scale)), task,
                              mode=args.mode)
    candidates = list(dict.fromkeys([*spec.candidates, *spec.shallow, *spec.deep]))
    stats = channel_stats(model, candidates, images, spr, args.batch_size)

    # Calibration frames for the block: spread over the split (every k-th frame), clean + patched twin.
    step = max(len(images) // args.fit_frames, 1)
    fit_idx = list(range(0, len(images), step))[: args.fit_frames]
    clean_u8 = images[fit_idx]
    crafted_info: list = []
    if args.frames or args.sources == "craft":
        sources, crafted_info = crafted_sources(args, model, images, labels, (h, w), fp, task)
    else:
        sources = training_sources(args, (h, w), fp, task)
    scene = scene_sampler(args, model, clean_u8, labels[fit_idx] if labels is not None else None)
    patched, masks, src_names = patch_frames(clean_u8, sources, seed=args.seed, capture=CaptureConfig.physical(),
                                             scene=scene, placement=args.placement)
    gt_work = mask_to_work(masks, spr.work_size)
    hm_clean = layer_heatmaps(model, candidates, clean_u8, stats, spr, args.batch_size, "heatmaps clean")
    hm_patch = layer_heatmaps(model, candidates, patched, stats, spr, args.batch_size, "heatmaps patched")
    ranking = rank_layers(hm_clean, hm_patch, gt_work)
    if args.shallow or args.deep:
        shallow = spec.resolve((args.shallow or ",".join(spec.shallow)).split(","))
        deep = spec.resolve((args.deep or ",".join(spec.deep)).split(","))
    elif args.layers == "paper":
        shallow, deep = list(spec.shallow), list(spec.deep)
    else:
        shallow, deep = pick_layers(ranking, args.n_shallow, args.n_deep)
    both = hm_clean.cat(hm_patch)
    h_s = aggregate([both.shallow[k] for k in shallow])
    h_d = aggregate([both.deep[k] for k in deep])
    target = torch.cat([torch.zeros_like(gt_work), gt_work])
    block, history = train_fusion(h_s, h_d, target, steps=args.fusion_steps, seed=args.seed)
    soft, d = scores(block, h_s, h_d)
    n = len(clean_u8)
    rep = roc_report(d[:n].numpy(), d[n:].numpy(), args.max_fpr)
    mask_thr, mask_ious = best_mask_threshold(soft[n:], gt_work)
    if args.mask_threshold != "auto":
        mask_thr = float(args.mask_threshold)
    cfg = ZMaskConfig(shallow=tuple(shallow), deep=tuple(deep), spr=spr, lambda0=rep.chosen.threshold,
                      mask_threshold=mask_thr)
    used = list(dict.fromkeys([*shallow, *deep]))
    grow_info = None
    if args.grow == "auto":
        zm = ZMask(model, cfg, ChannelStats({k: stats.mu[k] for k in used}, {k: stats.sigma[k] for k in used}), block)
        try:
            seeds = MASK_THRESHOLDS if args.mask_threshold == "auto" else (mask_thr,)
            grow_info = choose_grow(zm, clean_u8, patched, gt_work, args.batch_size, mask_thresholds=seeds)
        finally:
            zm.taps.remove()
        if grow_info["threshold"] is not None:
            mask_thr = grow_info["mask_threshold"]
            cfg = dataclasses.replace(cfg, mask_threshold=mask_thr, grow_threshold=grow_info["threshold"],
                                      grow_steps=grow_info["steps"])
    cal = Calibration(
        model_name=args.model, fingerprint=fp, input_size=(h, w), config=cfg,
        stats=ChannelStats({k: stats.mu[k] for k in used}, {k: stats.sigma[k] for k in used}),
        fusion=block.to_dict(), roc=rep.to_dict(),
        extra={"ranking": [r.to_dict() for r in ranking], "layer_choice": args.shallow and "explicit" or args.layers,
               "estimator": "pooled per-channel mean/std over all working-grid pixels (Chan parallel update, float64)",
               "stats_frames": len(images), "fit_frames": n, "split": args.split, "frames": origin,
               "crafted_patches": crafted_info, "placement": args.placement, "grow": grow_info,
               "scene_coverage": scene.coverage() if scene is not None else None,
               "sources": sorted(set(src_names)), "task": task,
               "mask_threshold": {"chosen": mask_thr, "rule": args.mask_threshold, "iou_by_threshold": mask_ious}, "fusion_history": history, "env": describe(dev),
               "seconds": round(time.time() - t0, 1)})
    out = Path(args.out or Path("calibration") / "shipped" / f"{model_slug(args.model)}.safetensors")
    cal.save(out)

    report = Path(args.report_dir or Path("benchmarks") / "results" / "calibration" / model_slug(args.model))
    plot_roc({"calibration (train)": {**rep.to_dict(), "chosen": rep.to_dict()["chosen"]}}, report / "roc_fit.png",
             f"{args.model}: d on {n} clean vs {n} patched train frames")
    show = [0, 1, 2, 3]
    frames = torch.cat([clean_u8[:1].float() / 255, patched[show[1:]]])
    pick = [0, n + 1, n + 2, n + 3]
    plot_heatmaps(frames, h_s[pick], h_d[pick], soft[pick], torch.cat([torch.zeros_like(gt_work[:1]), gt_work[1:4]]),
                  d[pick].tolist(), cfg.lambda0, report / "heatmaps_fit.png",
                  titles=["clean"] + [src_names[i] for i in (1, 2, 3)])
    (report / "layer_ranking.md").write_text(
        f"# Layer ranking for {args.model} ({n} clean + {n} patched frames, {origin})\n\n"
        + ranking_markdown(ranking, shallow, deep) + "\n")
    summary = {"artifact": str(out), "model": args.model, "fingerprint": fp, "shallow": shallow, "deep": deep,
               "lambda0": cfg.lambda0, "mask_threshold": mask_thr, "mask_iou_by_threshold": mask_ious, "grow": grow_info, "auc": rep.auc, "chosen": rep.to_dict()["chosen"],
               "youden": rep.to_dict()["youden"], "fusion": block.to_dict(), "seconds": round(time.time() - t0, 1)}
    write_json(report / "fit.json", summary)
    return summary


def main(argv=None) -> int:
    return run_job(fit, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
