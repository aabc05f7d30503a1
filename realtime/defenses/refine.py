"""Snap a found mask to the patch's own edges in the image (GrabCut), on flagged frames only.

Z-Mask finds a physical poster from inside the network, on a coarse working grid: its mask covers the
most over-activated part of the poster (for a poster in perspective, the near end) and spills a little
onto the facade around it. What is left unmasked keeps most of the damage, and growing the mask over
weaker evidence masks the context around the poster as well (README, "Physical scenes"). The patch,
however, is a printed texture with its own colours and edges; an appearance segmentation seeded by the
found mask can follow them:

* the mask's core (eroded) is sure patch, a ring beyond its dilated reach is sure background, the
  band in between is left to the colour models (probable patch near the mask, probable background
  further out);
* ``cv2.grabCut`` (Gaussian-mixture colour models + a graph cut on the image's contrast) decides the
  band, in a crop around the mask;
* the refined region replaces the mask unless it is implausible (much smaller or larger than what
  Z-Mask found), in which case the mask is kept as it was.

It runs on the image the network saw, after detection, and only changes the keep-mask of frames that
are already flagged: clean frames cost nothing and the flag is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class RefineConfig:
    """Settings of the GrabCut refinement (pixel sizes at the input resolution)."""
    margin: float = 1.1          # crop = the mask's box grown by this fraction of its size on every side
    core: int = 3                # erosion (px) of the found mask that is taken as sure patch
    reach: float = 0.8           # band beyond the mask left to the colour models, fraction of the mask's size
    iterations: int = 3
    min_ratio: float = 0.5       # refined area / found area outside [min_ratio, max_ratio]: keep the found mask
    max_ratio: float = 3.0


def _disk(r: int) -> np.ndarray:
    r = max(int(r), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def refine_one(rgb: np.ndarray, hit: np.ndarray, cfg: RefineConfig = RefineConfig()) -> Tuple[np.ndarray, bool]:
    """(refined hit, whether the refinement was used) for one HxWx3 uint8 frame and its HxW bool mask."""
    if not hit.any():
        return hit, False
    h, w = hit.shape
    ys, xs = np.nonzero(hit)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    size = max(y1 - y0, x1 - x0)
    m = int(np.ceil(cfg.margin * size)) + 2
    cy0, cy1, cx0, cx1 = max(y0 - m, 0), min(y1 + m, h), max(x0 - m, 0), min(x1 + m, w)
    crop = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1])
    found = hit[cy0:cy1, cx0:cx1].astype(np.uint8)
    reach = cv2.dilate(found, _disk(int(np.ceil(cfg.reach * size))))
    core = cv2.erode(found, _disk(cfg.core))
    gc = np.full(found.shape, cv2.GC_BGD, np.uint8)
    gc[reach > 0] = cv2.GC_PR_BGD
    gc[found > 0] = cv2.GC_PR_FGD
    gc[core > 0] = cv2.GC_FGD
    if not (gc == cv2.GC_BGD).any() or not (core > 0).any():
        return hit, False                 # no background in the crop, or a sliver of a mask: nothing to learn
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), gc, None, bgd, fgd, cfg.iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return hit, False
    new = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)      # full resolution: at half size the edges cost the gain
    ratio = new.sum() / max(int(found.sum()), 1)
    if not cfg.min_ratio <= ratio <= cfg.max_ratio:
        return hit, False
    out = hit.copy()
    out[cy0:cy1, cx0:cx1] = new
    return out, True


def parse_refine(value: Union[None, str, "RefineConfig"]) -> Optional[RefineConfig]:
    """``None``/"none" -> off; "grabcut" -> the default refinement; a ``RefineConfig`` as it is."""
    if value is None or isinstance(value, RefineConfig):
        return value
    name = str(value).lower()
    if name == "none":
        return None
    if name == "grabcut":
        return RefineConfig()
    raise ValueError(f"unknown mask refinement {value!r}; choose none or grabcut")


def refine_keep(x: torch.Tensor, keep: torch.Tensor, flagged: torch.Tensor,
                cfg: RefineConfig = RefineConfig()) -> torch.Tensor:
    """Keep-mask (N,1,H,W) with the masked region of each flagged frame snapped to the image's edges.

    ``x`` (N,3,H,W) in [0,1] is the frame the mask was found on; unflagged frames are returned as they are."""
    index = torch.nonzero(flagged, as_tuple=False).flatten().tolist()
    if not index:
        return keep
    out = keep.clone()
    frames = (x[index].detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    hits = (keep[index, 0] < 0.5).cpu().numpy()
    for j, i in enumerate(index):
        new, used = refine_one(frames[j], hits[j], cfg)
        if used:
            out[i, 0] = torch.from_numpy(~new).to(device=keep.device, dtype=keep.dtype)
    return out


__all__ = ["RefineConfig", "parse_refine", "refine_keep", "refine_one"]
