"""Train a registered detector on CamVid boxes (``realtime.data.detection``) and export it with its val mAP.

Frames are held in memory as uint8 and augmented per batch (horizontal flip, zoom-in crop with box
clipping, brightness/contrast jitter). AdamW with linear warm-up and cosine decay; the trunk of
``fcos_ddrnet`` (our CamVid segmentation weights) learns at ``--trunk-lr-mult`` of the rate and keeps its
BatchNorm statistics frozen (batches of 4 are too small to re-estimate them). Checkpoints every epoch
(``last.pt``; ``best.pt`` by val mAP@0.5), automatic resume from ``--out``, a ``--time-budget`` that
stops cleanly, and ``--export`` writing fp16 weights + a JSON sidecar (val mAP, per-class AP, command,
environment, fingerprint).

  python -m realtime.train_detection --model fcos_ddrnet --epochs 24 --export default     # 2-core CPU, ~45 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from realtime.data.detection import CamVidDetection
from realtime.core.devices import describe, pick_device
from realtime.models.registry import fingerprint, save_weights
from realtime.core.box_metrics import coco_map, predictions_to_cpu
from realtime.models.registry import build_model, default_weights_path, list_models


@dataclass
class DetTrainConfig:
    model: str = "fcos_ddrnet"
    data: Optional[str] = None
    out: str = "runs/{model}"
    epochs: int = 24
    time_budget: Optional[float] = None        # seconds of training; stops after the epoch that crosses it
    batch_size: int = 4
    lr: float = 1e-3
    trunk_lr_mult: float = 0.3
    weight_decay: float = 1e-4
    warmup_iters: int = 200
    zoom_max: float = 1.6                      # random zoom-in crop factor in [1, zoom_max]
    eval_every: int = 2
    limit: Optional[int] = None
    val_limit: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    export: Optional[str] = None


def load_split(data: Optional[str], split: str, limit: Optional[int]) -> Tuple[torch.Tensor, List[Dict]]:
    ds = CamVidDetection(data, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    frames, targets = [], []
    for i in tqdm(range(n), desc=f"load {split}", leave=False):
        img, _ = ds.seg.load(i)
        frames.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        targets.append(ds.target(i))
    return torch.stack(frames), targets


def augment(img: torch.Tensor, target: Dict, gen: torch.Generator, zoom_max: float,
            min_area: float = 16.0) -> Tuple[torch.Tensor, Dict]:
    """One uint8 (3,H,W) frame -> float [0,1] frame of the same size with consistently moved boxes."""
    _, h, w = img.shape
    x = img.float().div_(255.0)
    boxes, labels = target["boxes"].clone(), target["labels"].clone()
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    s = 1.0 + (zoom_max - 1.0) * torch.rand(1, generator=gen).item()
    if s > 1.01:
        ch, cw = int(round(h / s)), int(round(w / s))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        x = F.interpolate(x[None, :, y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear",
                          align_corners=False)[0]
        old_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, cw) * (w / cw)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, ch) * (h / ch)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (area >= min_area) & (area / (old_area * (w / cw) * (h / ch)).clamp(min=1e-6) >= 0.4)
        boxes, labels = boxes[keep], labels[keep]
    contrast = 0.75 + 0.5 * torch.rand(1, generator=gen).item()
    bright = 0.15 * (torch.rand(1, generator=gen).item() - 0.5)
    x = ((x - 0.5) * contrast + 0.5 + bright).clamp_(0, 1)
    return x, {"boxes": boxes, "labels": labels}


@torch.no_grad()
def evaluate(model: torch.nn.Module, frames: torch.Tensor, targets: List[Dict], device: torch.device,
             batch_size: int = 4, desc: str = "val") -> Dict:
    model.eval()
    preds: List[Dict] = []
    for i in tqdm(range(0, len(frames), batch_size), desc=desc, leave=False):
        x = frames[i:i + batch_size].to(device).float().div_(255.0)
        preds += predictions_to_cpu(model(x))
    return coco_map(preds, targets, model.class_names, tuple(frames.shape[-2:]))


def freeze_trunk_bn(model: torch.nn.Module) -> None:
    """Keep BatchNorm statistics of the backbone trunk fixed (tiny batches), still training its affine."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    for m in (body.modules() if body is not None else ()):
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class DetTrainer:
    def __init__(self, cfg: DetTrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out.format(model=cfg.model))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.device = pick_device(cfg.device)
        self.train_x, self.train_t = load_split(cfg.data, "train", cfg.limit)
        self.val_x, self.val_t = load_split(cfg.data, "val", cfg.val_limit)
        self.model = build_model(cfg.model, weights=None, device=self.device)
        trunk = [p for n, p in self.model.named_parameters() if n.startswith("backbone.body.")]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.body.")]
        mult = cfg.trunk_lr_mult if cfg.model == "fcos_ddrnet" else 1.0
        self.opt = torch.optim.AdamW([{"params": trunk, "lr_mult": mult}, {"params": rest, "lr_mult": 1.0}],
                                     lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.iters_per_epoch = max(len(self.train_x) // cfg.batch_size, 1)
        self.epoch, self.it, self.best, self.elapsed, self.history = 0, 0, -1.0, 0.0, []
        if (self.out / "last.pt").is_file():
            self._resume(self.out / "last.pt")

    def _save(self, path: Path) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                 "it": self.it, "best": self.best, "elapsed": self.elapsed, "gen": self.gen.get_state(),
                 "history": json.dumps(self.history), "config": json.dumps(dataclasses.asdict(self.cfg))}
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def _resume(self, path: Path) -> None:
        st = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(st["config"])["model"] != self.cfg.model:
            raise ValueError(f"{path} is a checkpoint of another model; use a different --out")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.epoch, self.it, self.best, self.elapsed = st["epoch"], st["it"], st["best"], st["elapsed"]
        self.gen.set_state(st["gen"])
        self.history = json.loads(st["history"])
        print(f"resumed {path} at epoch {self.epoch} (best mAP@0.5 {self.best:.4f})", flush=True)

    def lr_at(self, it: int) -> float:
        total = self.cfg.epochs * self.iters_per_epoch
        if it < self.cfg.warmup_iters:
            return self.cfg.lr * (it + 1) / self.cfg.warmup_iters
        t = min((it - self.cfg.warmup_iters) / max(total - self.cfg.warmup_iters, 1), 1.0)
        return self.cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    def train_epoch(self) -> Dict[str, float]:
        self.model.train()
        freeze_trunk_bn(self.model)
        order = torch.randperm(len(self.train_x), generator=self.gen)
        sums: Dict[str, float] = {}
        bar = tqdm(range(self.iters_per_epoch), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False)
        for b in bar:
            idx = order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size].tolist()
            pairs = [augment(self.train_x[i], self.train_t[i], self.gen, self.cfg.zoom_max) for i in idx]
            images = [p[0].to(self.device) for p in pairs]
            targets = [{k: v.to(self.device) for k, v in p[1].items()} for p in pairs]
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.it) * g["lr_mult"]
            losses = self.model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at iteration {self.it}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.opt.step()
            self.it += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        return {k: v / self.iters_per_epoch for k, v in sums.items()}

    def fit(self) -> Dict:
        while self.epoch < self.cfg.epochs:
            if self.cfg.time_budget is not None and self.elapsed >= self.cfg.time_budget:
                print(f"time budget {self.cfg.time_budget:.0f} s spent after {self.epoch} epochs", flush=True)
                break
            t0 = time.time()
            losses = self.train_epoch()
            self.epoch += 1
            rec: Dict = {"epoch": self.epoch, **{f"loss_{k}": round(v, 4) for k, v in losses.items()}}
            last = self.epoch == self.cfg.epochs
            if self.epoch % self.cfg.eval_every == 0 or last:
                res = evaluate(self.model, self.val_x, self.val_t, self.device)
                rec.update(map_50=round(res["map_50"], 4), map=round(res["map"], 4))
                if res["map_50"] > self.best:
                    self.best = res["map_50"]
                    torch.save({"model": self.model.state_dict(), "epoch": self.epoch, "map_50": self.best},
                               self.out / "best.pt")
            self.elapsed += time.time() - t0
            rec["elapsed_s"] = round(self.elapsed)
            self.history.append(rec)
            print(json.dumps(rec), flush=True)
            self._save(self.out / "last.pt")
        return {"epochs": self.epoch, "best_map_50": self.best, "elapsed_s": round(self.elapsed)}

    def export(self, target: str, command: str) -> Path:
        """Best checkpoint -> fp16 weights; val mAP re-measured with the fp16 weights as shipped."""
        path = default_weights_path(self.cfg.model) if target == "default" else Path(target)
        best = torch.load(self.out / "best.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(best["model"])
        save_weights(self.model, path, half=True)
        model16 = build_model(self.cfg.model, weights=path, device=self.device)
        res = evaluate(model16, self.val_x, self.val_t, self.device, desc="val fp16")
        meta = {"model": self.cfg.model, "dataset": "CamVid boxes (realtime.data.detection, min area 100 px)",
                "val_map_50": res["map_50"], "val_map": res["map"], "ap50_per_class": res["ap50_per_class"],
                "val_images": res["images"], "val_gt_boxes": res["gt_boxes"], "best_epoch": best["epoch"],
                "epochs": self.epoch, "train_seconds": round(self.elapsed), "history": self.history,
                "command": command, "env": describe(self.device), "fingerprint": fingerprint(model16),
                "config": dataclasses.asdict(self.cfg)}
        save_weights(model16, path, meta=meta, half=True)
        print(f"exported {path}: val mAP@0.5 {res['map_50']:.4f}, mAP@[.5:.95] {res['map']:.4f}", flush=True)
        return path


def parse_args(argv=None) -> DetTrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DetTrainConfig()
    p.add_argument("--model", default=d.model, choices=list_models("detection"))
    p.add_argument("--data", default=None, help="CamVid root (default: $REALTIME_DATA or ../shared/datasets/camvid)")
    for f in ("out", "epochs", "time_budget", "batch_size", "lr", "trunk_lr_mult", "weight_decay", "warmup_iters",
              "zoom_max", "eval_every", "limit", "val_limit", "seed", "device", "export"):
        default = getattr(d, f)
        kind = type(default) if default is not None else (float if f == "time_budget" else
                                                           str if f == "export" else int)
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=kind, default=default)
    return DetTrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    trainer = DetTrainer(cfg)
    print(json.dumps(trainer.fit()), flush=True)
    if cfg.export:
        trainer.export(cfg.export, "python -m realtime.train_detection " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
