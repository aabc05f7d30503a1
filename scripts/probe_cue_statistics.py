"""Probe: frame-level AUC of per-cell |z| statistics (mean, max, q90, share > 3, low tail) on every DDRNet stage,
clean val frames against patched ones (README, "Adaptive attackers"). Scratch-quality research probe.

    REALTIME_DATA=... python scripts/probe_cue_statistics.py ddrnet23_slim PATCH.png [PATCH.png ...]
"""
import sys, torch, torch.nn.functional as F, numpy as np
from sklearn.metrics import roc_auc_score
from realtime.models import build_model
from realtime.data import CamVid, resolve_data_dir
from realtime.core.taps import ActivationTaps
from realtime.attacks.apply import load_patch_png
from benchmarks.robustness_conditions import paste
torch.set_num_threads(2)
model_name = sys.argv[1] if len(sys.argv) > 1 else "ddrnet23_slim"
m = build_model(model_name, weights="default").eval()
layers = [n for n, c in m.named_children() if len(list(c.parameters())) > 0 and n not in ("final_layer","seghead_extra")]
taps = ActivationTaps(m, layers)
root = resolve_data_dir(None)
WS = (53, 70)
def work(f): return F.interpolate(f.float(), size=WS, mode="bilinear", align_corners=False)
tr = CamVid(root, "train"); ti, _ = tr.to_tensors(range(0, len(tr), 8), progress=False)
s1 = {}; s2 = {}; n = 0
with torch.no_grad():
    for i in range(0, len(ti), 4):
        _, t = taps(ti[i:i+4].float() / 255)
        for k in layers:
            w = work(t[k]); s1[k] = s1.get(k, 0) + w.sum((0, 2, 3)); s2[k] = s2.get(k, 0) + (w**2).sum((0, 2, 3))
        n += w.shape[0] * WS[0] * WS[1]
mu = {k: s1[k] / n for k in layers}; sd = {k: (s2[k] / n - mu[k]**2).clamp_min(1e-8).sqrt() for k in layers}
def stats(x):
    _, t = taps(x)
    out = {}
    for k in layers:
        z = (work(t[k]) - mu[k].view(1, -1, 1, 1)) / sd[k].view(1, -1, 1, 1)
        a = z.abs()
        cells = {"mean": a.mean(1, keepdim=True), "max": a.amax(1, keepdim=True),
                 "frac3": (a > 3).float().mean(1, keepdim=True), "q90": a.quantile(0.9, dim=1, keepdim=True)}
        for s, c in cells.items():
            p = F.avg_pool2d(c, 3, 1, 1, count_include_pad=False)
            out[(k, s)] = p.amax((1, 2, 3))
        pm = F.avg_pool2d(cells["mean"], 7, 1, 3, count_include_pad=False)
        out[(k, "low")] = -pm.amin((1, 2, 3))
    return out
va = CamVid(root, "val"); vi, _ = va.to_tensors(range(0, len(va), 2), progress=False)
conds = {"clean": None, "eot_L": f"realtime/attacks/library/{model_name}_eot_L.png"}
for d in sys.argv[2:]:
    conds[d.split("/")[-3] + ":" + d.split("/")[-1][:-4]] = d
res = {}
with torch.no_grad():
    for c, p in conds.items():
        patch = None if p is None else load_patch_png(p)[0]
        acc = {}
        for i in range(0, len(vi), 4):
            idx = list(range(i, min(i + 4, len(vi))))
            x = vi[i:i+4].float() / 255
            if patch is not None: x, _ = paste(x, patch, [2 * j for j in idx], 0, None)
            for k, v in stats(x).items(): acc.setdefault(k, []).append(v)
        res[c] = {k: torch.cat(v).numpy() for k, v in acc.items()}
keys = list(res["clean"].keys())
print("layer stat " + " ".join(c for c in conds if c != "clean"))
for k in keys:
    row = []
    for c in conds:
        if c == "clean": continue
        y = np.r_[np.zeros(len(res["clean"][k])), np.ones(len(res[c][k]))]
        row.append(roc_auc_score(y, np.r_[res["clean"][k], res[c][k]]))
    print(f"{k[0]:14s} {k[1]:6s} " + " ".join(f"{r:.3f}" for r in row))
