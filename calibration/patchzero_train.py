"""Train the PatchZero detector on CamVid TRAIN frames and measure it on VAL frames with held-out patches.

    python -m calibration.patchzero_train --data DIR --out realtime/defenses/weights/patchzero_camvid.pt \
        [--epochs 60] [--time-budget 50] [--resume]

Training data: each batch is half clean frames (target all zero) and half frames with one pasted patch
(target = the exact paste mask from ``apply_patch``), at random places, sizes (0.4-15 % of the frame),
aspect ratios, rotations, perspective and lighting. Patch sources: uniform noise, random colour/texture
patches (blocks, smooth blobs, stripes) and the library's ``beta0.x_L`` patches of every model. The
``eot_S/M/L`` library patches are never used in training: the robustness benchmark attacks with them,
and so does this script's validation, so train and test patches are disjoint.
Checkpoints (model + optimiser + RNG) go to ``--ckpt`` every epoch; ``--resume`` continues from there.
The output is an fp16 state dict plus a JSON sidecar with the settings and the validation metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from realtime.attacks.apply import CaptureConfig, Placement, apply_patch, load_patch_png
from realtime.data import CamVid

from realtime.defenses.patchzero import DEFAULT_WEIGHTS, PatchDetector, PatchZeroConfig, detect, pixel_counts, prf

LIBRARY = Path(__file__).resolve().parents[1] / "realtime" / "attacks" / "library"
TRAIN_PATCH_GLOB = "*_beta0.*_L.png"        # never the eot_* patches (held out for testing)
TEST_PATCH_GLOB = "*_eot_[SML].png"


@dataclass
class TrainConfig:
    """Training settings (recorded in the JSON sidecar)."""
    work_size: Tuple[int, int] = (180, 240)
    width: int = 16
    batch: int = 16
    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pos_weight: float = 2.0
    area_range: Tuple[float, float] = (0.004, 0.15)
    seed: int = 0


def train_capture() -> CaptureConfig:
    """Pose and lighting randomisation of the training pastes (stronger than ``physical()`` in pose)."""
    return CaptureConfig(scale=(0.9, 1.1), rotation_deg=30.0, perspective=0.15, brightness=(-0.15, 0.15),
                         contrast=(0.7, 1.2), color_gain=0.1, blur_sigma=(0.0, 1.0), noise_std=(0.0, 0.03),
                         jpeg_quality=(50.0, 95.0), p_geometric=0.8, p_photometric=0.8, p_blur=0.3,
                         p_noise=0.3, p_jpeg=0.2)


def texture_patch(hw: Tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A random colour/texture patch (3,h,w): coloured blocks, smooth blobs or stripes."""
    h, w = hw
    kind = int(torch.randint(0, 3, (1,), generator=gen))
    if kind == 0:                                     # blocks of random colours
        cells = int(torch.randint(2, 12, (1,), generator=gen))
        low = torch.rand(1, 3, cells, cells, generator=gen)
        return F.interpolate(low, size=(h, w), mode="nearest")[0]
    if kind == 1:                                     # smooth colour blobs
        cells = int(torch.randint(2, 6, (1,), generator=gen))
        low = torch.rand(1, 3, cells, cells, generator=gen)
        return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    period = float(torch.randint(3, 16, (1,), generator=gen))
    angle = float(torch.rand(1, generator=gen)) * math.pi
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    wave = (torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0).float()
    c0, c1 = torch.rand(3, 1, 1, generator=gen), torch.rand(3, 1, 1, generator=gen)
    return c0 * wave + c1 * (1 - wave)


def library_patches(pattern: str) -> Dict[str, torch.Tensor]:
    """Library patches matching ``pattern``, by file stem."""
    found = {p.stem: load_patch_png(p)[0] for p in sorted(LIBRARY.glob(pattern))}
    if not found:
        raise FileNotFoundError(f"no patches matching {pattern} in {LIBRARY}")
    return found


def sample_patch(cfg: TrainConfig, lib: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """One training patch at a random size/aspect: noise, texture or a (resized) beta library patch."""
    H, W = cfg.work_size
    lo, hi = cfg.area_range
    area = math.exp(math.log(lo) + float(torch.rand(1, generator=gen)) * (math.log(hi) - math.log(lo)))
    aspect = math.exp((float(torch.rand(1, generator=gen)) * 2 - 1) * math.log(2.0))     # w/h in [0.5, 2]
    h = max(4, min(H - 1, int(round(math.sqrt(area * H * W / aspect)))))
    w = max(4, min(W - 1, int(round(h * aspect))))
    kind = int(torch.randint(0, 3, (1,), generator=gen))
    if kind == 0:
        return torch.rand(3, h, w, generator=gen)
    if kind == 1:
        return texture_patch((h, w), gen)
    src = lib[int(torch.randint(0, len(lib), (1,), generator=gen))]
    return F.interpolate(src[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def make_batch(frames: torch.Tensor, idx: torch.Tensor, cfg: TrainConfig, lib: Sequence[torch.Tensor],
               gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Frames ``idx`` (uint8) -> (images in [0,1], target masks): the first half clean, the rest patched."""
    x = frames[idx].float().div(255)
    flip = torch.rand(len(idx), generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    gain = 0.8 + 0.4 * torch.rand(len(idx), 1, 1, 1, generator=gen)
    x = (x * gain).clamp(0, 1)
    y = torch.zeros(len(idx), 1, *x.shape[-2:])
    cap = train_capture()
    for i in range(len(idx) // 2, len(idx)):
        x[i:i + 1], y[i:i + 1] = apply_patch(x[i:i + 1], sample_patch(cfg, lib, gen), Placement("random"),
                                             cap, gen)
    return x, y


def loss_fn(logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Weighted BCE plus a soft Dice term over the patched frames (which keeps small patches visible)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight))
    p = torch.sigmoid(logits)
    has = target.flatten(1).sum(1) > 0
    if not bool(has.any()):
        return bce
    inter = (p * target).flatten(1).sum(1)[has]
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1)[has] + target.flatten(1).sum(1)[has] + 1)
    return bce + dice.mean()


def lr_at(base: float, done: float) -> float:
    """Linear warm-up over the first 3 % of training, then cosine to 1 % of ``base``; ``done`` in [0, 1]
    is the larger of the epoch and the time-budget fraction, so a budget cut still ends annealed."""
    done = min(max(done, 0.0), 1.0)
    if done < 0.03:
        return base * (0.1 + 0.9 * done / 0.03)
    t = (done - 0.03) / 0.97
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def load_split(data: Optional[str], split: str, size: Optional[Tuple[int, int]], limit: Optional[int]
               ) -> torch.Tensor:
    """A split as uint8 (N,3,h,w), resized (antialiased) to ``size`` when given."""
    ds = CamVid(data, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    imgs, _ = ds.to_tensors(range(n), progress=True)
    if size is None or tuple(imgs.shape[-2:]) == tuple(size):
        return imgs
    out = [F.interpolate(imgs[i:i + 32].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True).round().clamp(0, 255).to(torch.uint8) for i in range(0, n, 32)]
    return torch.cat(out)


@torch.no_grad()
def evaluate(net: PatchDetector, frames: torch.Tensor, inf: PatchZeroConfig, seed: int = 1
             ) -> Dict[str, Dict[str, float]]:
    """Pixel P/R/F1 of the thresholded detector on VAL frames: clean and with each held-out eot patch
    pasted (digital paste and simulated physical capture), plus frame-level flag rates."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    patches = library_patches(TEST_PATCH_GLOB)
    groups: Dict[str, List[int]] = {}
    flags: Dict[str, List[int]] = {}

    def add(key: str, counts: List[int], flagged: int) -> None:
        old = groups.setdefault(key, [0, 0, 0])
        groups[key] = [a + b for a, b in zip(old, counts)]
        flags.setdefault(key, [0, 0])
        flags[key] = [flags[key][0] + flagged, flags[key][1] + 1]

    for i in tqdm(range(frames.shape[0]), desc="val", unit="frame"):
        x = frames[i:i + 1].float().div(255)
        variants = [("clean", x, torch.zeros(1, 1, *x.shape[-2:]))]
        for stem, p in patches.items():
            size = stem.rsplit("_", 1)[-1]
            for cap_name, cap in (("digital", CaptureConfig.none()), ("physical", CaptureConfig.physical())):
                xp, m = apply_patch(x, p, Placement("random"), cap, gen)
                variants.append((f"eot_{size}_{cap_name}", xp, m))
        for key, xv, m in variants:
            region = (detect(net, xv, inf.work_size) > inf.threshold).float()
            flagged = int(float(region.mean()) > inf.min_area)
            counts = pixel_counts(region, m)
            add(key, counts, flagged)
            add("all", counts, flagged)
    report: Dict[str, Dict[str, float]] = {}
    for key, (tp, fp, fn) in groups.items():
        report[key] = {**prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn,
                       "flag_rate": flags[key][0] / flags[key][1], "frames": flags[key][1]}
    report["clean"]["false_positive_pixel_rate"] = groups["clean"][1] / (frames.shape[0] * frames.shape[-2]
                                                                          * frames.shape[-1])
    return report


@torch.no_grad()
def fit_min_area(net: PatchDetector, frames: torch.Tensor, inf: PatchZeroConfig, fpr: float = 0.01
                 ) -> Dict[str, float]:
    """The frame-flag threshold on the detected area: at most ``fpr`` of the clean TRAIN ``frames`` (uint8,
    already at the work size) exceed it. Returns the threshold and the resulting train flag rate."""
    from realtime.defenses.overactivation import threshold_at_fpr
    net.eval()
    areas = torch.cat([(detect(net, frames[i:i + 16].float().div(255), inf.work_size) > inf.threshold)
                       .float().flatten(1).mean(1) for i in range(0, frames.shape[0], 16)])
    t = threshold_at_fpr(areas, fpr)
    return {"min_area": t, "target_fpr": fpr, "train_flag_rate": float((areas > t).float().mean()),
            "frames": int(frames.shape[0])}


def write_report(meta: Dict, path: Path) -> None:
    """Markdown summary of the JSON sidecar (numbers come from the measurement, never typed in)."""
    t, v = meta["train"], meta["val"]
    lines = ["# PatchZero detector on CamVid", "",
             f"Detector: compact encoder-decoder, {meta['params']} parameters, trained on CamVid train "
             f"({meta['train_frames']} frames) at {t['work_size'][0]}x{t['work_size'][1]}, 50/50 clean and "
             f"patched, {meta['epochs_done']} epochs in {meta['train_minutes']:.1f} min on CPU.",
             f"Training patches: noise, random colour/texture and the library's beta0.x_L patches "
             f"({', '.join(meta['train_patches'])}). Test patches (held out, never trained on): "
             f"{', '.join(meta['test_patches'])}, pasted at random places on the {meta['val_frames']} "
             f"CamVid val frames at 360x480, digitally and with simulated physical capture.",
             f"Pixel metrics of the thresholded detector (threshold {meta['inference']['threshold']}, no "
             f"dilation); flag = detected area > {meta['inference']['min_area']:.5f} of the frame (fitted for "
             f"{meta['min_area_fit']['target_fpr']:.0%} flagged clean train frames; measured train flag rate "
             f"{meta['min_area_fit']['train_flag_rate']:.3f}).", "",
             "| set | precision | recall | F1 | flag rate |", "|---|---|---|---|---|"]
    for key in sorted(v):
        r = v[key]
        lines.append(f"| {key} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['flag_rate']:.3f} |")
    lines += ["", f"Clean val frames: false-positive pixel rate {v['clean']['false_positive_pixel_rate']:.5f}, "
              f"flagged {v['clean']['flag_rate']:.3f} of frames.",
              "Stage 2 of the paper (BPDA adversarial training against adaptive attacks) was not run.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--ckpt", default="runs/patchzero/ckpt.pt")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--time-budget", type=float, default=None, help="minutes of training, then stop")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="train frames (default all)")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--report", default="benchmarks/results/patchzero.md")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out and rewrite JSON/report")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, batch=args.batch)
    if cfg.batch < 2:
        raise SystemExit("--batch must be >= 2 (half clean, half patched)")
    torch.manual_seed(cfg.seed)
    net = PatchDetector(cfg.width)
    out, ckpt_path = Path(args.out), Path(args.ckpt)
    inf = PatchZeroConfig(work_size=cfg.work_size)
    epoch, elapsed, gen = 0, 0.0, torch.Generator().manual_seed(cfg.seed)
    frames = load_split(args.data, "train", cfg.work_size, args.limit)
    if args.eval_only:
        meta = json.loads(out.with_suffix(".json").read_text())
        state = torch.load(out, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    else:
        lib = list(library_patches(TRAIN_PATCH_GLOB).values())
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if args.resume and ckpt_path.is_file():
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            net.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
            epoch, elapsed = int(ck["epoch"]), float(ck["elapsed"])
            gen.set_state(ck["gen"])
            print(f"resumed at epoch {epoch} ({elapsed / 60:.1f} min)")
        budget = None if args.time_budget is None else args.time_budget * 60
        while epoch < cfg.epochs and (budget is None or elapsed < budget):
            net.train()
            t0, perm, tot = time.time(), torch.randperm(len(frames), generator=gen), 0.0
            steps = len(frames) // cfg.batch
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
            for s in bar:
                x, y = make_batch(frames, perm[s * cfg.batch:(s + 1) * cfg.batch], cfg, lib, gen)
                done = (epoch + s / steps) / cfg.epochs
                if budget is not None:
                    done = max(done, (elapsed + time.time() - t0) / budget)
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg.lr, done)
                loss = loss_fn(net(x), y, cfg.pos_weight)
                opt.zero_grad(); loss.backward(); opt.step()
                tot += float(loss.detach())
                bar.set_postfix(loss=f"{tot / (s + 1):.4f}")
            epoch, elapsed = epoch + 1, elapsed + time.time() - t0
            print(f"epoch {epoch}: loss {tot / steps:.4f}, {elapsed / 60:.1f} min", flush=True)
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                        "epoch": epoch, "elapsed": elapsed, "gen": gen.get_state()}, ckpt_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, out)
        net.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in net.state_dict().items()})      # evaluate what was shipped
        meta = {"train": {**asdict(cfg), "capture": asdict(train_capture())}, "epochs_done": epoch,
                "train_minutes": elapsed / 60, "train_frames": int(len(frames)),
                "params": sum(p.numel() for p in net.parameters()),
                "train_patches": sorted(p.stem for p in LIBRARY.glob(TRAIN_PATCH_GLOB)) + ["noise", "texture"],
                "test_patches": sorted(p.stem for p in LIBRARY.glob(TEST_PATCH_GLOB)),
                "dtype": "float16"}
    meta["min_area_fit"] = fit_min_area(net, frames, inf)
    inf.min_area = meta["min_area_fit"]["min_area"]
    meta["inference"] = asdict(inf)
    val = load_split(args.data, "val", None, args.val_limit)
    meta["val"] = evaluate(net, val, inf)
    meta["val_frames"] = int(val.shape[0])
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    write_report(meta, Path(args.report))
    print(json.dumps({k: {m: round(r[m], 4) for m in ("precision", "recall", "f1", "flag_rate")}
                      for k, r in meta["val"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
