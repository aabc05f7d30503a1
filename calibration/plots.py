"""PNG figures for calibration: ROC curve with the chosen operating point, heatmap overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def plot_roc(curves: Dict[str, Dict], path: Path, title: str) -> Path:
    """``curves``: label -> {'fpr', 'tpr', 'auc', optional 'chosen': {'fpr','tpr'}}."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=120)
    for label, c in curves.items():
        line, = ax.plot(c["fpr"], c["tpr"], label=f"{label} (AUC {c['auc']:.3f})")
        if c.get("chosen"):
            ax.plot([c["chosen"]["fpr"]], [c["chosen"]["tpr"]], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set_xlabel("false-positive rate (clean frames)")
    ax.set_ylabel("true-positive rate (patched frames)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmaps(frames: torch.Tensor, h_s: torch.Tensor, h_d: torch.Tensor, soft: torch.Tensor,
                  gt: torch.Tensor, scores: Sequence[float], lambda0: float, path: Path,
                  titles: Optional[Sequence[str]] = None) -> Path:
    """One row per frame: frame, H_S, H_D, soft mask M~, true patch mask."""
    n = len(frames)
    fig, axes = plt.subplots(n, 5, figsize=(12, 2.0 * n), dpi=100, squeeze=False)
    cols = ["frame", "H_S", "H_D", "soft mask M~", "true patch mask"]
    for i in range(n):
        img = frames[i].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [img, h_s[i, 0].numpy(), h_d[i, 0].numpy(), soft[i, 0].numpy(), gt[i, 0].numpy()]
        for j, p in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(p, cmap=None if j == 0 else ("gray" if j == 4 else "inferno"),
                      vmin=0 if j >= 3 else None, vmax=1 if j >= 3 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
        flag = "FLAGGED" if scores[i] > lambda0 else "clear"
        label = (titles[i] + "  " if titles else "") + f"d={scores[i]:.3g} {flag}"
        axes[i, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
