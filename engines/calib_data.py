"""INT8 calibration frames: CamVid train frames at the engine's input size, in fixed-size batches.

Frames are taken evenly spaced over the split (every sequence is represented), resized with area
interpolation (they are larger than the model input), and returned as float32 in [0,1], the same
preprocessing the live pipeline applies.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import EngineError


def calibration_indices(total: int, count: int) -> np.ndarray:
    """``count`` distinct indices spread evenly over ``range(total)`` (all of them when count >= total)."""
    if total < 1:
        raise EngineError("calibration needs at least one frame")
    count = min(count, total)
    return np.unique(np.linspace(0, total - 1, count).round().astype(int))


def calibration_batches(input_shape: Tuple[int, int], count: int, batch: int, root: Optional[str] = None,
                        split: str = "train") -> Iterator[torch.Tensor]:
    """Batches (B,3,H,W) float32 of ``count`` CamVid ``split`` frames at ``input_shape``; the last may be short."""
    from realtime.data import CamVid
    try:
        data = CamVid(root, split)
    except Exception as exc:
        raise EngineError(f"INT8 calibration needs CamVid frames ({exc}); set calib_data or REALTIME_DATA") from None
    idx = calibration_indices(len(data), count)
    for start in range(0, len(idx), batch):
        frames = torch.stack([data[int(i)][0] for i in idx[start:start + batch]])
        yield F.interpolate(frames, size=tuple(input_shape), mode="area").clamp_(0.0, 1.0)
