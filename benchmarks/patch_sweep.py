"""How every library patch of a model fares against it and against its calibrated Z-Mask.

    python -m benchmarks.patch_sweep --model ddrnet23_slim --split val --json out.json

For each patch (random control, EOT S/M/L, beta-controlled, defense-aware) pasted at seeded random
places on the split's frames: undefended mIoU outside the patch, Z-Mask-defended mIoU outside the
patch (second pass on flagged frames), mean shallow over-activation under the patch (L_OZ), mean
score d, detection AUC against the clean frames and TPR at lambda0, and mask IoU. Writes JSON, a
markdown table and, when beta patches exist, a plot of L_OZ / AUC / mIoU versus beta.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

from realtime.core.metrics import ConfusionMatrix  # noqa: E402
from realtime.defenses.artifact import load_calibration  # noqa: E402
from calibration.evaluate import mask_iou  # noqa: E402
from calibration.fit import LIBRARY  # noqa: E402
from realtime.core.cli import USER_ERRORS, report_error, write_json  # noqa: E402
from realtime.attacks import CaptureConfig, Placement, apply_patch, load_patch_png  # noqa: E402
from realtime.attacks.adaptive import over_activation  # noqa: E402
from realtime.data import CLASSES, IGNORE_INDEX, CamVid  # noqa: E402
from realtime.core.devices import describe, pick_device  # noqa: E402
from realtime.models import build_model, fingerprint, list_models, model_arg  # noqa: E402


@torch.no_grad()
def measure(zm, cal, images: torch.Tensor, labels: torch.Tensor, patch, seed: int, batch_size: int) -> Dict:
    """Run Z-Mask on the frames with ``patch`` pasted (``None`` = clean); per-frame arrays + confusion matrices."""
    dev = zm.mean_color.device
    g = torch.Generator().manual_seed(seed)
    cm_plain, cm_def = ConfusionMatrix(len(CLASSES), IGNORE_INDEX, dev), ConfusionMatrix(len(CLASSES), IGNORE_INDEX, dev)
    d, loz, iou = [], [], []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].float() / 255
        y = labels[s:s + batch_size].long().to(dev)
        if patch is None:
            m = torch.zeros(len(x), 1, *x.shape[-2:])
        else:
            x, m = apply_patch(x, patch, Placement("random"), CaptureConfig.physical(), g)
        x, m = x.to(dev), m.to(dev)
        r = zm(x)
        outside = m[:, 0] < 0.5
        cm_plain.update(r.output.argmax(1), y, outside)
        cm_def.update(r.defended_output.argmax(1), y, outside)
        d.append(r.score.cpu())
        if patch is not None:
            loz.append(over_activation(r.taps, m, cal.config.shallow, zm.stats.mu, zm.stats.sigma, cal.config.spr).cpu())
            iou.append(mask_iou(r.mask.cpu(), m.cpu()))
    out = {"d": torch.cat(d).numpy(), "miou_undefended": cm_plain.summary(CLASSES)["miou"],
           "miou_zmask": cm_def.summary(CLASSES)["miou"]}
    if loz:
        out["loz"], out["iou"] = torch.cat(loz).numpy(), torch.cat(iou).numpy()
    return out


def sweep(args: argparse.Namespace) -> Dict:
    dev = pick_device(args.device)
    model = build_model(args.model, device=dev)
    cal = load_calibration(args.calibration or Path("calibration") / "shipped" / f"{args.model}.safetensors", model)
    zm = cal.build_zmask(model).eval()
    ds = CamVid(args.data, args.split)
    images, labels = ds.to_tensors(range(min(len(ds), args.limit or len(ds))), progress=True)
    fp = fingerprint(model)
    patches = []
    for png in sorted(Path(args.patches).glob(f"{args.model}_*.png")):
        patch, meta = load_patch_png(png)
        if meta.get("fingerprint") == fp:
            patches.append((png.stem[len(args.model) + 1:], patch, meta))
    clean = measure(zm, cal, images, labels, None, args.seed, args.batch_size)
    lam = cal.config.lambda0
    res: Dict = {"model": args.model, "split": args.split, "frames": len(images), "lambda0": lam,
                 "clean": {"miou_undefended": clean["miou_undefended"], "miou_zmask": clean["miou_zmask"],
                           "fpr": float((clean["d"] > lam).mean()), "mean_d": float(clean["d"].mean())},
                 "patches": {}, "env": describe(dev)}
    for name, patch, meta in tqdm(patches, desc="patches", unit="patch"):
        r = measure(zm, cal, images, labels, patch, args.seed, args.batch_size)
        y = np.r_[np.zeros(len(clean["d"])), np.ones(len(r["d"]))]
        flagged = r["d"] > lam
        res["patches"][name] = {
            "kind": meta.get("kind"), "beta": meta.get("beta"), "alpha": meta.get("alpha"),
            "hw": meta.get("hw"), "miou_undefended": r["miou_undefended"], "miou_zmask": r["miou_zmask"],
            "l_oz": float(r["loz"].mean()), "mean_d": float(r["d"].mean()),
            "auc": float(roc_auc_score(y, np.r_[clean["d"], r["d"]])), "tpr_at_lambda0": float(flagged.mean()),
            "mask_iou_flagged": float(r["iou"][flagged].mean()) if flagged.any() else None}
    return res


def markdown(res: Dict) -> str:
    c = res["clean"]
    lines = [f"# {res['model']}: library patches vs the undefended model and Z-Mask ({res['split']}, "
             f"{res['frames']} frames, one seeded random placement each, physical capture)", "",
             f"lambda0 = {res['lambda0']:.4g}; clean frames: mIoU {c['miou_undefended']:.4f} undefended, "
             f"{c['miou_zmask']:.4f} with Z-Mask, FPR {c['fpr']:.3f}, mean d {c['mean_d']:.4g}", "",
             "| patch | kind | mIoU undefended | mIoU Z-Mask | L_OZ | mean d | AUC | TPR@lambda0 | mask IoU (flagged) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, p in res["patches"].items():
        iou = "-" if p["mask_iou_flagged"] is None else f"{p['mask_iou_flagged']:.3f}"
        lines.append(f"| {name} | {p['kind']} | {p['miou_undefended']:.4f} | {p['miou_zmask']:.4f} | {p['l_oz']:.3f} | "
                     f"{p['mean_d']:.4g} | {p['auc']:.3f} | {p['tpr_at_lambda0']:.3f} | {iou} |")
    return "\n".join(lines) + "\n"


def plot_beta(res: Dict, path: Path) -> bool:
    rows = sorted((p["beta"], p) for p in res["patches"].values() if p["kind"] == "beta" and p["beta"] is not None)
    eot = res["patches"].get("eot_L")
    if not rows:
        return False
    b = [r[0] for r in rows] + ([1.0] if eot else [])
    get = lambda k: [r[1][k] for r in rows] + ([eot[k]] if eot else [])  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=110)
    for ax, key, label in zip(axes, ("l_oz", "auc", "miou_undefended"),
                              ("L_OZ (over-activation under patch)", "detection AUC", "mIoU outside patch")):
        ax.plot(b, get(key), "o-")
        if key == "miou_undefended":
            ax.plot(b, get("miou_zmask"), "s--", label="with Z-Mask")
            ax.axhline(res["clean"]["miou_undefended"], color="grey", ls=":", label="clean")
            ax.legend(fontsize=7)
        ax.set_xlabel("beta (1.0 = plain EOT patch)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{res['model']}: L patches vs beta ({res['split']}, {res['frames']} frames)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.patch_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=model_arg,
                   help="a registered name ({}) or torchvision:NAME / package.module:factory".format(", ".join(list_models())))
    p.add_argument("--calibration", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--patches", default=str(LIBRARY))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        res = sweep(args)
    except USER_ERRORS as exc:
        return report_error(exc)
    out = Path(args.out_dir)
    md = markdown(res)
    print(md)
    (out / f"patch_sweep_{args.model}_{args.split}.md").write_text(md)
    plot_beta(res, out / f"beta_sweep_{args.model}_{args.split}.png")
    write_json(args.json or out / f"patch_sweep_{args.model}_{args.split}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
