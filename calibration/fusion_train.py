"""Training the 8-scalar fusion block: BCE between the soft mask M~ and the true patch mask on the
working grid, over clean frames (all-zero target) and patched frames. Adam, lr 0.01 (the paper's),
full batch: the heatmaps are precomputed, so each step costs a few element-wise ops."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from realtime.defenses import FusionBlock


def train_fusion(h_s: torch.Tensor, h_d: torch.Tensor, target: torch.Tensor, steps: int = 400, lr: float = 0.01,
                 seed: int = 0, progress: bool = True) -> Tuple[FusionBlock, List[Dict[str, float]]]:
    """``h_s``/``h_d``/``target``: (N,1,HR,WR); target is the patch coverage in [0,1] (0 for clean frames)."""
    if not (h_s.shape == h_d.shape == target.shape):
        raise ValueError(f"shapes differ: {tuple(h_s.shape)}, {tuple(h_d.shape)}, {tuple(target.shape)}")
    torch.manual_seed(seed)
    block = FusionBlock()
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    history = []
    bar = tqdm(range(steps), desc="fusion block", unit="step", disable=not progress)
    for step in bar:
        soft, _ = block(h_s, h_d)
        loss = F.binary_cross_entropy(soft.clamp(1e-6, 1 - 1e-6), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            history.append({"step": step, "bce": float(loss.detach())})
            bar.set_postfix(bce=f"{float(loss.detach()):.4f}")
    return block, history


@torch.no_grad()
def scores(block: FusionBlock, h_s: torch.Tensor, h_d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(soft masks, d) for precomputed heatmaps."""
    return block(h_s, h_d)


MASK_THRESHOLDS: Tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def best_mask_threshold(soft: torch.Tensor, gt: torch.Tensor, grid: Tuple[float, ...] = MASK_THRESHOLDS
                        ) -> Tuple[float, Dict[float, float]]:
    """Threshold on M~ with the highest pooled IoU against the true patch masks (working grid), and the
    IoU at every grid value. The paper thresholds at 0.5; a block whose soft masks peak at the patch centre
    (our detector's) covers only part of the patch there, and what is left of a patch still attacks."""
    target = gt > 0.5
    ious = {}
    for t in grid:
        pred = soft > t
        union = (pred | target).sum().item()
        ious[t] = (pred & target).sum().item() / union if union else 0.0
    return max(grid, key=lambda t: (ious[t], t)), ious
