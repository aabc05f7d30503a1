"""Motion-compensated mask propagation: move a carried mask with the scene instead of leaving it in place.

A printed patch is flat, so between two frames its image moves by a homography. ``estimate_motion``
tracks corners (pyramidal Lucas-Kanade, forward-backward checked) in a band around the masked region
of the previous frame and fits that homography with RANSAC; ``warp_mask`` moves a (1,1,H,W) mask with
it. When tracking fails (too few corners, a degenerate fit, an implausible jump) the mask is left in
place and the voter's dilation is the only motion margin, as without compensation.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch

from realtime.core.geometry import track_homography

MIN_POINTS = 10
MARGIN = 40            # pixels around the masked region where corners are tracked
MAX_SHIFT = 0.25       # a fitted motion moving the mask's centre by more than this fraction of the frame is refused


def gray(x: torch.Tensor) -> np.ndarray:
    """HxW uint8 luminance of one (3,H,W) frame in [0,1] (on any device)."""
    y = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).clamp(0, 1).mul(255).to(torch.uint8)
    return y.cpu().numpy()


def estimate_motion(prev: np.ndarray, cur: np.ndarray, region: np.ndarray) -> Optional[np.ndarray]:
    """3x3 homography taking ``region`` (HxW bool, in ``prev``) to where it is in ``cur``; None if unknown."""
    if prev.shape != cur.shape or not region.any():
        return None
    h, w = prev.shape
    ys, xs = np.nonzero(region)
    y0, y1 = max(int(ys.min()) - MARGIN, 0), min(int(ys.max()) + MARGIN + 1, h)
    x0, x1 = max(int(xs.min()) - MARGIN, 0), min(int(xs.max()) + MARGIN + 1, w)
    roi = np.zeros((h, w), np.uint8)
    roi[y0:y1, x0:x1] = 255
    hom = track_homography(prev, cur, roi, MIN_POINTS, max_corners=200)
    if hom is None:
        return None
    c = np.array([[[xs.mean(), ys.mean()]]], np.float64)
    moved = cv2.perspectiveTransform(c, hom)[0, 0]
    if np.abs(moved - c[0, 0]).max() > MAX_SHIFT * max(h, w):
        return None
    return hom


def warp_mask(mask: torch.Tensor, hom: np.ndarray) -> torch.Tensor:
    """A (1,1,H,W) float mask moved by ``hom`` (nearest neighbour; outside the frame becomes 0)."""
    m = mask[0, 0].detach().float().cpu().numpy()
    h, w = m.shape
    out = cv2.warpPerspective(m, hom, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return torch.from_numpy(out).to(device=mask.device, dtype=mask.dtype).view(1, 1, h, w)


__all__ = ["estimate_motion", "gray", "warp_mask"]
