"""Probe: deep-stage under-activation and output-confidence statistics, AUC and the share flagged at the
clean train 99 % quantile (README, "Adaptive attackers"). Scratch-quality research probe.

    REALTIME_DATA=... python scripts/probe_underactivation.py ddrnet23_slim layer4,layer5,spp PATCH.png [...]
"""
import sys, torch, torch.nn.functional as F, numpy as np
from sklearn.metrics import roc_auc_score
from realtime.models import build_model
from realtime.data import CamVid, resolve_data_dir
from realtime.core.taps import ActivationTaps, first_tensor
from realtime.attacks.apply import load_patch_png
from benchmarks.robustness_conditions import paste
torch.set_num_threads(2)
model_name = sys.argv[1]
m = build_model(model_name, weights="default").eval()
layers = sys.argv[2].split(",")
taps = ActivationTaps(m, layers)
root = resolve_data_dir(None)
WS = (53, 70)
def work(f): return F.interpolate(f.float(), size=WS, mode="bilinear", align_corners=False)
tr = CamVid(root, "train"); ti, _ = tr.to_tensors(range(0, len(tr), 8), progress=False)
th_i, _ = tr.to_tensors(range(4, len(tr), 4), progress=False)
s1 = {}; s2 = {}; n = 0
with torch.no_grad():
    for i in range(0, len(ti), 4):
        _, t = taps(ti[i:i+4].float() / 255)
        for k in layers:
            w = work(t[k]); s1[k] = s1.get(k, 0) + w.sum((0, 2, 3)); s2[k] = s2.get(k, 0) + (w**2).sum((0, 2, 3))
        n += w.shape[0] * WS[0] * WS[1]
mu = {k: s1[k] / n for k in layers}; sd = {k: (s2[k] / n - mu[k]**2).clamp_min(1e-8).sqrt() for k in layers}
def stats(x):
    out, t = taps(x)
    lg = first_tensor(out).float()
    pr = lg.softmax(1)
    o = {("out", "conf"): -pr.amax(1).mean((1, 2)), ("out", "ent"): -(pr * pr.clamp_min(1e-9).log()).sum(1).mean((1, 2)) * -1,
         ("out", "ncls"): -(F.one_hot(lg.argmax(1), lg.shape[1]).float().mean((1, 2)) > 0.005).float().sum(1)}
    for k in layers:
        z = (work(t[k]) - mu[k].view(1, -1, 1, 1)) / sd[k].view(1, -1, 1, 1)
        a = z.abs().mean(1, keepdim=True)
        for pool in (3, 9):
            p = F.avg_pool2d(a, pool, 1, pool // 2, count_include_pad=False)
            o[(k, f"-max{pool}")] = -p.amax((1, 2, 3))
        o[(k, "-mean")] = -a.mean((1, 2, 3))
        o[(k, "-q90")] = -a.flatten(1).quantile(0.9, dim=1)
        o[(k, "std")] = -z.std(dim=(2, 3)).mean(1)       # spatial diversity per channel, low => collapsed
    return o
def run(imgs, patch, base):
    acc = {}
    with torch.no_grad():
        for i in range(0, len(imgs), 4):
            idx = list(range(i, min(i + 4, len(imgs))))
            x = imgs[i:i+4].float() / 255
            if patch is not None: x, _ = paste(x, patch, [base * j for j in idx], 0, None)
            for k, v in stats(x).items(): acc.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in acc.items()}
thr = run(th_i, None, 1)
va = CamVid(root, "val"); vi, _ = va.to_tensors(range(len(va)), progress=False)
conds = {"clean": None, "eot_L": f"realtime/attacks/library/{model_name}_eot_L.png"}
for d in sys.argv[3:]:
    conds[d.split("/")[-3][-4:] + ":" + d.split("/")[-1][:-4]] = d
res = {c: run(vi, None if p is None else load_patch_png(p)[0], 1) for c, p in conds.items()}
print("layer stat  [AUC / TPR@thr(train q.99)]  clean-val-FPR | " + " | ".join(c for c in conds if c != "clean"))
for k in res["clean"]:
    t = np.quantile(thr[k], 0.99)
    row = [f"{(res['clean'][k] > t).mean():.2f}"]
    for c in conds:
        if c == "clean": continue
        y = np.r_[np.zeros(len(res["clean"][k])), np.ones(len(res[c][k]))]
        row.append(f"{roc_auc_score(y, np.r_[res['clean'][k], res[c][k]]):.2f}/{(res[c][k] > t).mean():.2f}")
    print(f"{k[0]:12s} {k[1]:6s} " + " | ".join(row))
