"""Automatic layer selection (the paper leaves it as future work).

Every candidate layer is scored on the calibration frames by
  * detection AUC: how well the layer's heatmap maximum separates patched from clean frames,
  * localisation IoU: for patched frames, the IoU between the true patch mask and the layer's
    k hottest pixels, k = the patch's area (so no threshold is needed),
with the shallow kernel set (for S) and the deep kernel set (for D). S takes the layers with the best
mean of AUC and IoU (the soft mask is built from H_S, so it must localise); D takes the best AUC
(H_D gates the region of interest and weights the score d).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from calibration.collect import LayerHeatmaps


@dataclass
class LayerScore:
    layer: str
    auc_shallow: float
    iou_shallow: float
    auc_deep: float
    iou_deep: float

    @property
    def shallow_score(self) -> float:
        return 0.5 * (self.auc_shallow + self.iou_shallow)

    def to_dict(self) -> Dict:
        return {**asdict(self), "shallow_score": self.shallow_score}


def mask_to_work(mask: torch.Tensor, work_size: Tuple[int, int]) -> torch.Tensor:
    """(N,1,H,W) {0,1} patch mask -> (N,1,HR,WR) float coverage fraction on the working grid."""
    return F.adaptive_avg_pool2d(mask.float(), work_size)


def topk_iou(heat: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-frame IoU of the k hottest pixels with the binary ``gt`` (k = gt area); (N,)."""
    n = heat.shape[0]
    h, g = heat.reshape(n, -1), gt.reshape(n, -1).bool()
    out = torch.zeros(n)
    for i in range(n):
        k = int(g[i].sum())
        if k == 0:
            continue
        top = torch.zeros_like(g[i])
        top[h[i].topk(k).indices] = True
        out[i] = (top & g[i]).sum() / (top | g[i]).sum()
    return out


def _auc(clean: torch.Tensor, patched: torch.Tensor) -> float:
    c = clean.amax(dim=(1, 2, 3)).numpy()
    p = patched.amax(dim=(1, 2, 3)).numpy()
    return float(roc_auc_score(np.r_[np.zeros(len(c)), np.ones(len(p))], np.r_[c, p]))


def rank_layers(clean: LayerHeatmaps, patched: LayerHeatmaps, gt_work: torch.Tensor) -> List[LayerScore]:
    """Score every layer present in both heatmap sets; sorted by the shallow score, best first."""
    gt = gt_work > 0.5
    scores = []
    for layer in clean.shallow:
        scores.append(LayerScore(
            layer=layer,
            auc_shallow=_auc(clean.shallow[layer], patched.shallow[layer]),
            iou_shallow=float(topk_iou(patched.shallow[layer], gt).mean()),
            auc_deep=_auc(clean.deep[layer], patched.deep[layer]),
            iou_deep=float(topk_iou(patched.deep[layer], gt).mean())))
    return sorted(scores, key=lambda s: -s.shallow_score)


def pick_layers(ranking: Sequence[LayerScore], n_shallow: int = 3, n_deep: int = 2) -> Tuple[List[str], List[str]]:
    shallow = [s.layer for s in sorted(ranking, key=lambda s: -s.shallow_score)[:n_shallow]]
    deep = [s.layer for s in sorted(ranking, key=lambda s: -s.auc_deep)[:n_deep]]
    return shallow, deep


def ranking_markdown(ranking: Sequence[LayerScore], shallow: Sequence[str], deep: Sequence[str]) -> str:
    lines = ["| layer | AUC (K_S) | top-k IoU (K_S) | AUC (K_D) | top-k IoU (K_D) | in S | in D |",
             "|---|---|---|---|---|---|---|"]
    for s in ranking:
        lines.append(f"| `{s.layer}` | {s.auc_shallow:.3f} | {s.iou_shallow:.3f} | {s.auc_deep:.3f} | "
                     f"{s.iou_deep:.3f} | {'x' if s.layer in shallow else ''} | {'x' if s.layer in deep else ''} |")
    return "\n".join(lines)
