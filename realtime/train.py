"""Train a registered segmentation model on CamVid from scratch (no pretrained weights exist here).

The whole split is held as uint8 tensors on the training device and augmented there in batches
(scale 0.5-2x, crop, flip, colour jitter), so a GPU is never starved by image decoding and a
2-core CPU spends its time on the model. OHEM cross-entropy (optionally class-weighted), poly LR
with linear warm-up, bf16 autocast on GPU, checkpoints every epoch (``last.pt``, ``best.pt`` by val
mIoU) and automatic resume from ``--out``. ``--hold-out SEQ`` trains a leave-one-sequence-out fold: train +
val pooled, every sequence but SEQ trained on, SEQ scored (``realtime.data.folds``); ``best.pt`` is then
the latest evaluation, not the best one, so the held-out drive never picks the checkpoint.

Examples:
  python -m realtime.train --model ddrnet23_slim --epochs 300 --batch-size 16          # GPU
  python -m realtime.train --model ddrnet23_slim --base-scale 0.5 --crop 180x240 \\
      --epochs 60 --batch-size 8                                                          # 2-core CPU
  python -m realtime.train --model bisenetv1 --time-budget 1800 --export default       # fit a time box
  python -m realtime.train --model ddrnet23_slim --hold-out 0001TP --out runs/loso_0001TP   # one fold
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from realtime.core.cli import parse_hw
from realtime.data import IGNORE_INDEX, NUM_CLASSES, CamVid, DataNotFoundError
from realtime.data.augment import AugmentConfig, augment_batch
from realtime.data.folds import load_frames
from realtime.core.devices import autocast, describe, pick_device
from realtime.core.losses import class_weights, segmentation_loss
from realtime.models.evaluate import evaluate, recompute_bn_stats
from realtime.models import build_model, default_weights_path, fingerprint, list_models, model_arg, save_weights


@dataclass
class TrainConfig:
    model: str = "ddrnet23_slim"
    data: Optional[str] = None
    out: str = "runs/{model}"
    epochs: int = 200
    time_budget: Optional[float] = None   # seconds; at the end of warm-up fixes `epochs` to fit (logged, replayable)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    warmup_epochs: int = 2
    crop: Tuple[int, int] = (360, 480)
    base_scale: float = 1.0
    scale_min: float = 0.5
    scale_max: float = 2.0
    loss: str = "ohem"
    ohem_thresh: float = 0.7
    class_weighting: str = "sqrt_medfreq"
    eval_every: int = 5
    eval_size: Optional[Tuple[int, int]] = None   # default: the val frames' size (360x480)
    limit: Optional[int] = None                   # train on the first N frames only (smoke tests)
    val_limit: Optional[int] = None
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    export: Optional[str] = None                  # 'default' -> the registry's shipped-weights path
    precise_bn: int = 0                           # >0: recompute BN statistics on this many train frames before eval
    hold_out: Optional[str] = None                # a sequence: train on train + val without it, score it
    blur: float = 0.0                             # capture augmentation: blur probability,
    noise: float = 0.0                            # max sensor-noise std,
    jpeg: float = 0.0                             # JPEG round-trip probability (0 = off: older recipes replay)


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    return torch.Generator().manual_seed(seed)


def lr_at(cfg: TrainConfig, it: int, iters_per_epoch: int, total_epochs: int) -> float:
    """Linear warm-up (independent of the run length), then poly(0.9) decay to zero."""
    warm = cfg.warmup_epochs * iters_per_epoch
    if it < warm:
        return cfg.lr * (it + 1) / warm
    total = max(total_epochs * iters_per_epoch - warm, 1)
    return cfg.lr * max(1.0 - (it - warm) / total, 0.0) ** 0.9


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


class Trainer:
    """Holds the state of one run; ``fit()`` trains until the (possibly budget-fixed) epoch count."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out.format(model=cfg.model))
        self.out.mkdir(parents=True, exist_ok=True)
        self.gen = seed_everything(cfg.seed, cfg.deterministic)
        self.device = pick_device(cfg.device)
        if cfg.hold_out:
            fit = load_frames(cfg.data, exclude=[cfg.hold_out], limit=cfg.limit, progress=True)
            held = load_frames(cfg.data, include=[cfg.hold_out], limit=cfg.val_limit, progress=True)
            print(f"fold: train on {', '.join(fit.names())} ({len(fit)} frames), score {cfg.hold_out} ({len(held)})")
            train_xy, (self.val_x, self.val_y) = (fit.images, fit.labels), (held.images, held.labels)
        else:
            train, val = CamVid(cfg.data, "train"), CamVid(cfg.data, "val")
            tidx = range(min(cfg.limit, len(train))) if cfg.limit else None
            vidx = range(min(cfg.val_limit, len(val))) if cfg.val_limit else None
            train_xy = train.to_tensors(tidx, progress=True)
            self.val_x, self.val_y = val.to_tensors(vidx, progress=True)
        self.train_x, self.train_y = (t.to(self.device) for t in train_xy)
        counts = torch.bincount(self.train_y.flatten().long().cpu(), minlength=NUM_CLASSES + 1)[:NUM_CLASSES]
        self.weights = class_weights(counts, cfg.class_weighting)
        if self.weights is not None:
            self.weights = self.weights.to(self.device)
        self.model = build_model(cfg.model, weights=None, device=self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(cfg, self.model)
        self.aug = AugmentConfig(crop=cfg.crop, scale=(cfg.scale_min, cfg.scale_max), base_scale=cfg.base_scale,
                                 blur=cfg.blur, noise=cfg.noise, jpeg=cfg.jpeg)
        self.iters_per_epoch = max(len(self.train_x) // cfg.batch_size, 1)
        self.epoch, self.it, self.best, self.total_epochs = 0, 0, -1.0, cfg.epochs
        self.budget_fixed = cfg.time_budget is None
        self.history: list = []
        self.elapsed = 0.0
        last = self.out / "last.pt"
        if last.is_file():
            self._resume(last)

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
                "it": self.it, "best": self.best, "total_epochs": self.total_epochs,
                "budget_fixed": self.budget_fixed, "gen": self.gen.get_state(), "elapsed": self.elapsed,
                "torch_rng": torch.get_rng_state(), "history": json.dumps(self.history),
                "config": json.dumps(dataclasses.asdict(self.cfg))}

    def _save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(self._state(), tmp)
        tmp.replace(path)  # atomic: a kill mid-write never leaves a truncated checkpoint

    def _resume(self, path: Path) -> None:
        st = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(st["config"])
        if saved["model"] != self.cfg.model:
            raise ValueError(f"{path} is a checkpoint of '{saved['model']}', not '{self.cfg.model}'")
        if saved.get("hold_out") != self.cfg.hold_out:
            raise ValueError(f"{path} was trained with --hold-out {saved.get('hold_out')}, not {self.cfg.hold_out}; "
                             f"use another --out")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.epoch, self.it, self.best = int(st["epoch"]), int(st["it"]), float(st["best"])
        self.total_epochs, self.budget_fixed = int(st["total_epochs"]), bool(st["budget_fixed"])
        self.elapsed = float(st["elapsed"])
        self.gen.set_state(st["gen"].cpu())
        torch.set_rng_state(st["torch_rng"].cpu())
        self.history = json.loads(st["history"])
        print(f"resumed {path} at epoch {self.epoch}/{self.total_epochs}, best val mIoU {self.best:.4f}")

    # -- training ------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        cfg, model = self.cfg, self.model
        model.train()
        perm = torch.randperm(len(self.train_x), generator=self.gen)
        bar = tqdm(range(self.iters_per_epoch), desc=f"epoch {self.epoch + 1}/{self.total_epochs}",
                   unit="it", leave=False)
        total = 0.0
        for k in bar:
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size].to(self.device)
            x, y = augment_batch(self.train_x[idx], self.train_y[idx], self.aug, self.gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, self.it, self.iters_per_epoch, self.total_epochs)
            for g in self.opt.param_groups:
                g["lr"] = lr
            with autocast(self.device, cfg.amp):
                out, aux = model(x)
            thresh = cfg.ohem_thresh if cfg.loss == "ohem" else None
            w = self.weights if cfg.loss in ("ohem", "wce") else None
            loss = segmentation_loss(out, y, IGNORE_INDEX, w, thresh)
            for a, aw in zip(aux, type(model).aux_weights):
                loss = loss + aw * segmentation_loss(a, y, IGNORE_INDEX, w, thresh)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {self.it}; lower --lr or disable --amp")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.it += 1
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (k + 1):.3f}", lr=f"{lr:.2e}")
        return total / self.iters_per_epoch

    def validate(self) -> Dict:
        if self.cfg.precise_bn:
            step = max(len(self.train_x) // self.cfg.precise_bn, 1)
            recompute_bn_stats(self.model, self.train_x[::step][: self.cfg.precise_bn],
                               self.cfg.eval_size or tuple(self.val_x.shape[-2:]), batch_size=8)
        return evaluate(self.model, self.val_x, self.val_y, batch_size=8, size=self.cfg.eval_size,
                        amp=self.cfg.amp)

    def fit(self) -> Dict:
        cfg = self.cfg
        while self.epoch < self.total_epochs:
            t0 = time.time()
            loss = self.train_epoch()
            self.epoch += 1
            rec: Dict = {"epoch": self.epoch, "loss": round(loss, 4)}
            if self.epoch % cfg.eval_every == 0 or self.epoch == self.total_epochs:
                res = self.validate()
                rec["val_miou"] = round(res["miou"], 4)
                if res["miou"] > self.best or cfg.hold_out:     # a fold never selects on its held-out drive
                    self.best = res["miou"]
                    torch.save({"model": self.model.state_dict(), "epoch": self.epoch, "miou": self.best},
                               self.out / "best.pt")
            took = time.time() - t0
            self.elapsed += took
            if not self.budget_fixed and self.epoch >= cfg.warmup_epochs:
                # Decide from the latest epoch (the first carries cudnn autotuning and allocator warm-up),
                # before warm-up ends, so the poly schedule is exactly what --epochs N would give.
                per_epoch = took * 1.05 + (self.elapsed / self.epoch) * 0.02
                left = cfg.time_budget - self.elapsed
                self.total_epochs = max(self.epoch + int(left / per_epoch), cfg.warmup_epochs + 1)
                self.budget_fixed = True
                print(f"time budget {cfg.time_budget:.0f}s at {per_epoch:.1f}s/epoch -> --epochs "
                      f"{self.total_epochs} (replay with --epochs {self.total_epochs})")
            rec["seconds"] = round(self.elapsed, 1)
            self.history.append(rec)
            print(json.dumps(rec), flush=True)
            self._save(self.out / "last.pt")
        return {"best_val_miou": self.best, "epochs": self.total_epochs, "seconds": self.elapsed}

    def export(self, target: str, command: str) -> Path:
        """Write the best checkpoint as fp16 weights + JSON sidecar (val mIoU measured in fp32 and fp16)."""
        best = torch.load(self.out / "best.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(best["model"])
        fp32 = self.validate()["miou"]
        path = default_weights_path(self.cfg.model) if target == "default" else Path(target)
        save_weights(self.model, path, half=True)
        model16 = build_model(self.cfg.model, weights=path, device=self.device)
        res16 = evaluate(model16, self.val_x, self.val_y, batch_size=8, size=self.cfg.eval_size, amp=False)
        meta = {"model": self.cfg.model, "dataset": "CamVid 11 classes", "val_miou_fp16_weights": res16["miou"],
                "val_miou_fp32_weights": fp32, "per_class_iou": res16["per_class_iou"],
                "best_epoch": int(best["epoch"]), "epochs": self.total_epochs, "train_seconds": round(self.elapsed),
                "command": command, "env": describe(self.device), "fingerprint": fingerprint(model16),
                "config": dataclasses.asdict(self.cfg), "history": self.history}
        save_weights(model16, path, meta=meta, half=True)
        print(f"exported {path} (val mIoU fp32 {fp32:.4f}, fp16 {res16['miou']:.4f})")
        return path


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m realtime.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, type=model_arg,
                   help="a registered name ({}) or torchvision:NAME / package.module:factory".format(", ".join(list_models())))
    p.add_argument("--data", default=None, help="CamVid root (else $REALTIME_DATA, else ../shared/datasets/camvid)")
    p.add_argument("--out", default=d.out, help="run directory; an existing last.pt there is resumed")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; fixes --epochs when warm-up ends")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"])
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--crop", type=parse_hw, default=d.crop, help="training crop HxW")
    p.add_argument("--base-scale", type=float, default=d.base_scale, help="fixed resize factor (0.5 on CPU)")
    p.add_argument("--scale-min", type=float, default=d.scale_min)
    p.add_argument("--scale-max", type=float, default=d.scale_max)
    p.add_argument("--loss", default=d.loss, choices=["ohem", "ce", "wce"])
    p.add_argument("--ohem-thresh", type=float, default=d.ohem_thresh)
    p.add_argument("--class-weighting", default=d.class_weighting, choices=["none", "medfreq", "sqrt_medfreq"])
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-size", type=parse_hw, default=None, help="validate at HxW (default: native 360x480)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N frames only")
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--precise-bn", type=int, default=d.precise_bn,
                   help="recompute BatchNorm statistics on N train frames (eval size) before each evaluation and "
                        "the export: for models whose BN momentum is small (torchvision MobileNetV3: 0.01)")
    p.add_argument("--export", default=None, help="after training write fp16 weights here ('default' = shipped)")
    p.add_argument("--blur", type=float, default=d.blur, help="capture augmentation: Gaussian blur probability")
    p.add_argument("--noise", type=float, default=d.noise, help="capture augmentation: max noise std ([0,1] scale)")
    p.add_argument("--jpeg", type=float, default=d.jpeg, help="capture augmentation: JPEG round-trip probability")
    p.add_argument("--hold-out", default=None, metavar="SEQ",
                   help="leave-one-sequence-out fold: train on train + val without SEQ, evaluate on SEQ")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
    except (DataNotFoundError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = trainer.fit()
    print(json.dumps(summary))
    if cfg.export:
        trainer.export(cfg.export, "python -m realtime.train " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
