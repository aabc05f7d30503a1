"""Research probe (README, "Adaptive attackers"): could another |z| statistic see a patch that hides from Z-Mask?

    REALTIME_DATA=... python scripts/probe_cue_statistics.py over ddrnet23_slim PATCH.png [PATCH.png ...]
    REALTIME_DATA=... python scripts/probe_cue_statistics.py under ddrnet23_slim layer4,layer5,spp PATCH.png [...]

``over``: on every stage of the model, per-cell channel mean / max / 90th percentile of |z| and the share of
|z| > 3 (frame max of 3x3 pools), plus a low-tail statistic; frame-level AUC of clean val frames against
the patched ones (the library eot_L patch first, then each PATCH).
``under``: on the named stages, how far below clean the frame's |z| falls (pool maxima, mean, q90, spatial
spread) and the output's confidence; AUC and the share of patched frames over the clean train 99 % quantile.
Channel statistics come from every 8th train frame; patches are pasted at the robustness benchmark's places.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from benchmarks.robustness_conditions import paste
from realtime.attacks.apply import load_patch_png
from realtime.core.taps import ActivationTaps, first_tensor
from realtime.data import CamVid, resolve_data_dir
from realtime.models import build_model

WORK = (53, 70)
Stats = Dict[Tuple[str, str], torch.Tensor]


def work(f: torch.Tensor) -> torch.Tensor:
    return F.interpolate(f.float(), size=WORK, mode="bilinear", align_corners=False)


def channel_stats(taps: ActivationTaps, images: torch.Tensor) -> Tuple[Dict, Dict]:
    """Per-layer channel mean and std on the working grid over ``images`` (uint8)."""
    s1: Dict = {}
    s2: Dict = {}
    n = 0
    with torch.no_grad():
        for i in range(0, len(images), 4):
            _, t = taps(images[i:i + 4].float() / 255)
            for k in taps.layers:
                w = work(t[k])
                s1[k] = s1.get(k, 0) + w.sum((0, 2, 3))
                s2[k] = s2.get(k, 0) + (w ** 2).sum((0, 2, 3))
            n += w.shape[0] * WORK[0] * WORK[1]
    mu = {k: s1[k] / n for k in taps.layers}
    return mu, {k: (s2[k] / n - mu[k] ** 2).clamp_min(1e-8).sqrt() for k in taps.layers}


def over_stats(taps, mu, sd, x) -> Stats:
    _, t = taps(x)
    out: Stats = {}
    for k in taps.layers:
        a = ((work(t[k]) - mu[k].view(1, -1, 1, 1)) / sd[k].view(1, -1, 1, 1)).abs()
        cells = {"mean": a.mean(1, keepdim=True), "max": a.amax(1, keepdim=True),
                 "frac3": (a > 3).float().mean(1, keepdim=True), "q90": a.quantile(0.9, dim=1, keepdim=True)}
        for s, c in cells.items():
            out[(k, s)] = F.avg_pool2d(c, 3, 1, 1, count_include_pad=False).amax((1, 2, 3))
        out[(k, "low")] = -F.avg_pool2d(cells["mean"], 7, 1, 3, count_include_pad=False).amin((1, 2, 3))
    return out


def under_stats(taps, mu, sd, x) -> Stats:
    res, t = taps(x)
    pr = first_tensor(res).float().softmax(1)
    out: Stats = {("out", "conf"): -pr.amax(1).mean((1, 2)),
                  ("out", "ent"): (pr * pr.clamp_min(1e-9).log()).sum(1).mean((1, 2))}
    for k in taps.layers:
        z = (work(t[k]) - mu[k].view(1, -1, 1, 1)) / sd[k].view(1, -1, 1, 1)
        a = z.abs().mean(1, keepdim=True)
        for pool in (3, 9):
            out[(k, f"-max{pool}")] = -F.avg_pool2d(a, pool, 1, pool // 2, count_include_pad=False).amax((1, 2, 3))
        out[(k, "-mean")] = -a.mean((1, 2, 3))
        out[(k, "-q90")] = -a.flatten(1).quantile(0.9, dim=1)
        out[(k, "std")] = -z.std(dim=(2, 3)).mean(1)         # low: a spatially collapsed map
    return out


def collect(stat: Callable, taps, mu, sd, images: torch.Tensor, patch, indices: List[int]) -> Dict:
    acc: Dict = {}
    with torch.no_grad():
        for i in range(0, len(images), 4):
            x = images[i:i + 4].float() / 255
            if patch is not None:
                x, _ = paste(x, patch, indices[i:i + 4], 0, None)
            for k, v in stat(taps, mu, sd, x).items():
                acc.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in acc.items()}


def auc(clean: np.ndarray, patched: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(patched))], np.r_[clean, patched])


def main(argv: List[str]) -> None:
    torch.set_num_threads(2)
    mode, model_name, rest = argv[0], argv[1], argv[2:]
    model = build_model(model_name, weights="default").eval()
    if mode == "over":
        layers = [n for n, c in model.named_children()
                  if any(True for _ in c.parameters()) and n not in ("final_layer", "seghead_extra")]
        stat, every = over_stats, 2
    else:
        layers, rest = rest[0].split(","), rest[1:]
        stat, every = under_stats, 1
    taps = ActivationTaps(model, layers)
    root = resolve_data_dir(None)
    train = CamVid(root, "train")
    mu, sd = channel_stats(taps, train.to_tensors(range(0, len(train), 8), progress=False)[0])
    val = CamVid(root, "val")
    idx = list(range(0, len(val), every))
    images = val.to_tensors(idx, progress=False)[0]
    patches = {"eot_L": f"realtime/attacks/library/{model_name}_eot_L.png", **{p: p for p in rest}}
    clean = collect(stat, taps, mu, sd, images, None, idx)
    res = {n: collect(stat, taps, mu, sd, images, load_patch_png(p)[0], idx) for n, p in patches.items()}
    thr = {}
    if mode == "under":                        # thresholds from clean train frames the statistics did not see
        held = train.to_tensors(range(4, len(train), 4), progress=False)[0]
        thr = {k: np.quantile(v, 0.99) for k, v in
               collect(stat, taps, mu, sd, held, None, list(range(len(held)))).items()}
    print("layer stat | " + " | ".join(patches) + ("  [AUC / share over the train q.99]" if thr else "  [AUC]"))
    for k in clean:
        cells = [f"{auc(clean[k], r[k]):.2f}" + (f"/{(r[k] > thr[k]).mean():.2f}" if thr else "") for r in res.values()]
        print(f"{k[0]:14s} {k[1]:6s} | " + " | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
