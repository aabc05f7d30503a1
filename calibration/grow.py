"""Choose the mask-growing threshold (``ZMaskConfig.grow_threshold``) on the calibration frames.

Candidates are high quantiles of the fine shallow map on the CLEAN calibration frames (a cell above
the q-quantile is rarer than 1 - q on clean footage, whatever the model's scale), so the rule carries
to models and scenes it was not tuned on. The winner maximises the pooled IoU of the grown keep-mask
with the true patch masks on the patched twins that the calibrated lambda0 flags; with several seed
thresholds on M~ (``mask_thresholds``) the pair is chosen jointly.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch
from tqdm import tqdm

from realtime.defenses import ZMask

QUANTILES = (0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999)


@torch.no_grad()
def _maps(zm: ZMask, frames: torch.Tensor, batch_size: int, desc: str) -> Tuple[torch.Tensor, ...]:
    """(soft, score, fine) of every frame (float in [0,1] or uint8), at the working size."""
    dev = zm.mean_color.device
    soft, score, fine = [], [], []
    for i in tqdm(range(0, len(frames), batch_size), desc=desc, unit="batch"):
        x = frames[i:i + batch_size].to(dev)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        _, taps = zm.taps(x)
        h_s, h_d, f = zm.reference_maps(taps)
        s, d = zm.fusion(h_s, h_d)
        soft.append(s.cpu())
        score.append(d.cpu())
        fine.append(f.cpu())
    return torch.cat(soft), torch.cat(score), torch.cat(fine)


def choose_grow(zm: ZMask, clean: torch.Tensor, patched: torch.Tensor, gt_work: torch.Tensor,
                batch_size: int = 8, steps: int = 24, mask_thresholds: Sequence[float] = ()) -> Dict:
    """``{"threshold", "quantile", "mask_threshold", "iou_by_quantile", "iou_without"}`` for ``zm``'s
    calibrated config; ``mask_thresholds`` (default: the config's own) are the seed thresholds tried."""
    _, _, fine_clean = _maps(zm, clean, batch_size, "grow: clean maps")
    soft, score, fine = _maps(zm, patched, batch_size, "grow: patched maps")
    flagged = score > zm.cfg.lambda0
    truth = gt_work > 0.5
    if not bool(flagged.any()):
        return {"threshold": None, "quantile": None, "iou_by_quantile": {}, "iou_without": None,
                "note": "no patched calibration twin is flagged at lambda0: growing left off"}

    def pooled_iou(masks: torch.Tensor) -> float:
        m, t = masks[flagged], truth[flagged]
        union = (m | t).sum()
        return float((m & t).sum() / union) if union else 0.0

    base = pooled_iou(soft > zm.cfg.mask_threshold)
    flat = fine_clean.flatten().double()
    flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    seeds = tuple(mask_thresholds) or (zm.cfg.mask_threshold,)
    rows: List[Tuple[float, float, float, float]] = []
    saved = zm.cfg
    try:
        for mt in seeds:
            for q in QUANTILES:
                thr = float(torch.quantile(flat, q))
                zm.cfg = dataclasses.replace(saved, mask_threshold=mt, grow_threshold=thr, grow_steps=steps)
                rows.append((mt, q, thr, pooled_iou(zm.grow(soft, fine) > mt)))
    finally:
        zm.cfg = saved
    table = {f"{r[0]}@{r[1]}": r[3] for r in rows}
    mt, q, thr, iou = max(rows, key=lambda r: (r[3], r[0]))
    if iou <= base:
        return {"threshold": None, "quantile": None, "mask_threshold": saved.mask_threshold,
                "iou_by_quantile": table, "iou_without": base,
                "note": "growing does not improve the calibration masks: left off"}
    return {"threshold": thr, "quantile": q, "mask_threshold": mt, "steps": steps, "iou_by_quantile": table,
            "iou_without": base, "iou": iou, "flagged_twins": int(flagged.sum())}


__all__ = ["QUANTILES", "choose_grow"]
