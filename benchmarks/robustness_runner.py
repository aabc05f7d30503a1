"""Run one defense on one patch condition and keep every per-frame number (resumable cells).

A *cell* is one (defense, condition) pair over the chosen frames. It stores the confusion matrix of
the defended prediction on the pixels outside the true patch, per-frame detection scores and flags,
per-frame (tp, fp, fn) pixel counts of the defense's mask against the true patch, and per-frame
latency. Cells are written to ``<partial_dir>/<defense>__<condition>.json`` with a signature of the
settings, so ``--resume`` reuses exactly the cells computed under the same settings.

Latency: wall time of ``defense(x)`` (CUDA synchronised before and after on a GPU) divided by the
batch size, i.e. per-frame latency at batch 1 and amortised per-frame time at larger batches.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from realtime.core.metrics import ConfusionMatrix
from realtime.attacks.apply import CaptureConfig
from realtime.data import CLASSES, IGNORE_INDEX

from .robustness_conditions import Condition, paste
from .robustness_metrics import per_frame_mask_counts


@dataclass
class CellSettings:
    """Everything a cell's numbers depend on besides the defense and the patch pixels."""
    model: str
    fingerprint: str
    split: str
    frames: int
    seed: int
    capture: str
    batch: int
    device: str
    every: int = 1          # frame stride over the split (part of what the cells were measured on)


@dataclass
class Cell:
    """Raw per-frame results of one (defense, condition)."""
    defense: str
    condition: str
    signature: Dict[str, Any]
    confusion: List[List[int]]                          # truth x prediction, outside the true patch
    latency_ms: List[float]                             # per frame
    pixels_per_frame: int
    scores: Optional[List[float]] = None                # defenses that flag
    flagged: Optional[List[bool]] = None
    mask_counts: Optional[List[List[int]]] = None       # per frame (tp, fp, fn); defenses that mask
    confusion_outside_l: Optional[List[List[int]]] = None   # clean frames scored outside the L-patch place
    extra: Dict[str, Any] = field(default_factory=dict)


def cell_signature(settings: CellSettings, defense_info: Dict[str, Any], condition: Condition) -> Dict[str, Any]:
    """What must match for a saved cell to be reused."""
    return {**asdict(settings), "defense": json.loads(json.dumps(defense_info, default=str)),
            "condition": condition.name, "patch_sha256": condition.sha256}


def cell_path(partial_dir: Path, defense: str, condition: str) -> Path:
    return Path(partial_dir) / f"{defense}__{condition}.json"


def save_cell(cell: Cell, partial_dir: Path) -> Path:
    """Write a cell atomically (temp file + rename), so an interrupted write never leaves half a file."""
    path = cell_path(partial_dir, cell.defense, cell.condition)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cell)) + "\n")
    tmp.replace(path)
    return path


def load_cell(partial_dir: Path, defense: str, condition: str, signature: Dict[str, Any]) -> Optional[Cell]:
    """The saved cell if it exists and was computed under ``signature``, else None."""
    path = cell_path(partial_dir, defense, condition)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("signature") != json.loads(json.dumps(signature)):
        return None
    return Cell(**data)


def logits_of(output: Any) -> torch.Tensor:
    """The (N,C,H,W) logits inside a defense output (a tensor, or a dict with ``out``/a tuple's first)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return logits_of(output["out"])
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise ValueError(f"cannot find segmentation logits in a defense output of type {type(output).__name__}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(defense: Any, x: torch.Tensor, device: torch.device) -> Tuple[Any, float]:
    """``(defense(x), ms per frame)``: synchronised around the call, without autograd unless the defense
    needs gradients (SLGS/WLGS saliency)."""
    grad_ctx = nullcontext if getattr(defense, "needs_grad", False) else torch.no_grad
    with grad_ctx():
        _sync(device)
        t0 = time.perf_counter()
        res = defense(x)
        _sync(device)
    return res, (time.perf_counter() - t0) * 1e3 / x.shape[0]


def warm_up(defense: Any, images_u8: torch.Tensor, device: torch.device, batch: int) -> None:
    """One untimed call (kernel selection, lazy allocation) so the first timed frame is not an outlier."""
    x = images_u8[:batch].to(device).float() / 255
    with torch.no_grad() if not getattr(defense, "needs_grad", False) else nullcontext():
        defense(x)
    _sync(device)


def run_cell(defense: Any, condition: Condition, images_u8: torch.Tensor, labels_u8: torch.Tensor,
             settings: CellSettings, signature: Dict[str, Any], device: torch.device,
             capture: Optional[CaptureConfig] = None, l_patch_hw: Optional[tuple] = None,
             progress: bool = True) -> Cell:
    """Run ``defense`` over every frame with ``condition``'s patch pasted; returns the raw cell.

    ``l_patch_hw``: for the clean condition, also score the clean prediction outside the place the L
    patch would occupy (the pixel set the eot_L column is scored on).
    """
    n_cls = len(CLASSES)
    cm = ConfusionMatrix(n_cls, IGNORE_INDEX, device)
    cm_l = ConfusionMatrix(n_cls, IGNORE_INDEX, device) if (condition.patch is None and l_patch_hw) else None
    patch = condition.patch.to(device) if condition.patch is not None else None
    lat: List[float] = []
    scores: List[float] = []
    flagged: List[bool] = []
    counts: List[np.ndarray] = []
    has_score = has_flag = has_mask = False
    n = len(images_u8)
    bar = tqdm(range(0, n, settings.batch), desc=f"{defense.name}/{condition.name}", unit="batch",
               disable=not progress, leave=False)
    for s in bar:
        idx = list(range(s, min(s + settings.batch, n)))
        x = images_u8[s:s + len(idx)].to(device).float() / 255
        y = labels_u8[s:s + len(idx)].to(device).long()
        x, gt = paste(x, patch, idx, settings.seed, capture)
        x = x.detach()
        res, dt = timed_call(defense, x, device)
        lat += [dt] * len(idx)
        logits = logits_of(res.output).detach()
        if logits.shape[0] != len(idx) or logits.shape[-2:] != y.shape[-2:]:
            raise ValueError(f"defense {defense.name} returned logits {tuple(logits.shape)} for labels "
                             f"{tuple(y.shape)}; expected (N,C,H,W) at the label size")
        pred = logits.argmax(1)
        cm.update(pred, y, valid=gt[:, 0] < 0.5)
        if cm_l is not None:
            _, gt_l = paste(x, torch.zeros(3, *l_patch_hw, device=device), idx, settings.seed, capture)
            cm_l.update(pred, y, valid=gt_l[:, 0] < 0.5)
        if res.flagged is not None:
            has_flag = True
            flagged += [bool(v) for v in res.flagged.detach().reshape(-1).cpu().tolist()]
        if res.score is not None:
            has_score = True
            scores += [float(v) for v in res.score.detach().reshape(-1).float().cpu().tolist()]
        if res.mask is not None:
            has_mask = True
            counts.append(per_frame_mask_counts(res.mask.detach(), gt))
    if has_flag and not has_score:                       # a flag without a score: the flag is the score
        scores = [float(f) for f in flagged]
        has_score = True
    pix = int(images_u8.shape[-2] * images_u8.shape[-1])
    return Cell(defense=defense.name, condition=condition.name, signature=signature,
                confusion=cm.mat.cpu().tolist(), latency_ms=lat, pixels_per_frame=pix,
                scores=scores if has_score else None, flagged=flagged if has_flag else None,
                mask_counts=np.concatenate(counts).tolist() if has_mask else None,
                confusion_outside_l=cm_l.mat.cpu().tolist() if cm_l is not None else None)


__all__ = ["Cell", "CellSettings", "cell_path", "cell_signature", "load_cell", "logits_of", "run_cell",
           "save_cell", "warm_up"]
