"""Patches as a camera sees them: posters on facade planes found from a label map, tracked between
frames, occluded by foreground objects -- and the same rendering as an EOT transformation.

Geometry (shared by the ``demo`` source, the physical benchmark, physical EOT crafting and
calibration on rendered patches):

* ``place_poster``: on the more built-up side of the road, a quadrilateral whose top and bottom edges
  converge to the road's vanishing point (a plane parallel to the driving direction), its bottom just
  above the facade's base line; the candidate covering the most building pixels wins.
* ``track_quad``: a facade is a plane, so the poster's image motion between two frames is a
  homography, estimated from corners tracked (pyramidal Lucas-Kanade + RANSAC) on building pixels.
* occlusion: pixels labelled as a foreground object (pole, sign, tree, fence, car, pedestrian,
  cyclist) hide the poster, so the ground-truth mask is exactly the visible poster pixels.

``SceneSampler`` draws such posters for EOT: per frame, a random candidate over poster scale, distance
along the street and side of the road, corner jitter, the capture simulation and the frame's own
occluders; frames without a facade fall back to an axis-aligned placement.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from realtime.core.geometry import track_homography

from .apply import CaptureConfig, Placement, render_quads, sample_quads

BUILDING, ROAD = 1, 3
OCCLUDERS = (2, 5, 6, 7, 8, 9, 10)      # pole, tree, sign, fence, car, pedestrian, bicyclist
FRACTIONS = (0.18, 0.12, 0.24, 0.06, 0.30)   # near-edge x as a fraction of the width, tried in order

Quad = np.ndarray                        # (4,2) float64 corners (x, y): TL, TR, BR, BL


def scene_capture() -> CaptureConfig:
    """The physical-capture simulation minus its geometric jitter (geometry comes from the scene)."""
    return dataclasses.replace(CaptureConfig.physical(), p_geometric=0.0)


def vanishing_point(label: np.ndarray) -> Tuple[float, float]:
    """(x, y) of the far end of the road region; the frame's upper centre when no road is labelled."""
    h, w = label.shape
    rows = np.nonzero((label == ROAD).sum(1) >= 3)[0]
    if rows.size == 0:
        return w / 2.0, 0.42 * h
    top = rows[0]
    band = label[top: top + max(3, h // 30)] == ROAD
    xs = np.nonzero(band)[1]
    return float(xs.mean()), float(top)


def quad_fill(quad: Quad, shape: Tuple[int, int]) -> np.ndarray:
    """HxW bool raster of a quad (pixel centres inside)."""
    m = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(m, np.round(quad * 16).astype(np.int32), 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def quad_area(quad: Quad) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def convex(quad: Quad) -> bool:
    e = np.roll(quad, -1, 0) - quad
    cross = e[:, 0] * np.roll(e, -1, 0)[:, 1] - e[:, 1] * np.roll(e, -1, 0)[:, 0]
    return bool((cross > 1e-6).all())


def poster_candidate(label: np.ndarray, near_scale: float, frac: float, left: bool,
                     vp: Optional[Tuple[float, float]] = None) -> Optional[Tuple[Quad, float]]:
    """One poster quad with its near edge at ``frac`` of the width on the ``left``/right side, and the
    fraction of its pixels on building; None when the geometry does not allow one there."""
    h, w = label.shape
    bld = label == BUILDING
    vx, vy = vp if vp is not None else vanishing_point(label)
    xn = w * frac if left else w * (1 - frac)
    col = bld[:, int(np.clip(xn, 0, w - 1))]
    if not col.any() or abs(vx - xn) < 40:
        return None
    hn = near_scale * abs(vx - xn)
    yb = float(np.nonzero(col)[0].max()) - 0.15 * hn          # just above the facade's base line
    yt = yb - hn
    xf = xn + (0.9 * hn if left else -0.9 * hn)
    if (left and xf >= vx - 10) or (not left and xf <= vx + 10) or yt < 0:
        return None
    s = (xf - vx) / (xn - vx)                                  # far-edge scale along lines to the VP
    quad = np.array([[xn, yt], [xf, vy + (yt - vy) * s], [xf, vy + (yb - vy) * s], [xn, yb]])
    if not left:
        quad = quad[[1, 0, 3, 2]]                                # keep TL, TR, BR, BL order
    if not convex(quad):
        return None
    inside = quad_fill(quad, (h, w))
    cov = float(bld[inside].mean()) if inside.any() else 0.0
    return quad, cov


def place_poster(label: np.ndarray, near_scale: float) -> Optional[Quad]:
    """A poster on the facade of the more built-up side, None if no candidate lies on a building.

    The near-edge height is ``near_scale * |vx - x|`` (a fixed-size print: image size falls with the
    distance, which grows towards the vanishing point). Candidates are tried from mid-distance
    outwards; the first that lies >= 85 % on building pixels wins, else the best-covered one.
    """
    w = label.shape[1]
    bld = label == BUILDING
    left = bld[:, : w // 2].sum() >= bld[:, w // 2:].sum()
    vp = vanishing_point(label)
    best, best_cov = None, 0.0
    for frac in FRACTIONS:
        cand = poster_candidate(label, near_scale, frac, left, vp)
        if cand is None:
            continue
        quad, cov = cand
        if cov >= 0.85:
            return quad
        if cov > best_cov:
            best, best_cov = quad, cov
    return best if best_cov >= 0.5 else None


def track_quad(prev_rgb: np.ndarray, rgb: np.ndarray, prev_label: np.ndarray, quad: Quad,
               min_inliers: int) -> Optional[Quad]:
    """The quad moved by the facade homography between two clean frames; None when tracking fails."""
    h, w = prev_label.shape
    g0 = cv2.cvtColor(prev_rgb, cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    x0, y0 = np.floor(quad.min(0) - 60).astype(int)
    x1, y1 = np.ceil(quad.max(0) + 60).astype(int)
    roi = np.zeros((h, w), np.uint8)
    roi[max(y0, 0): max(y1, 0), max(x0, 0): max(x1, 0)] = 255
    roi[prev_label != BUILDING] = 0
    hom = track_homography(g0, g1, roi, min_inliers)
    if hom is None:
        return None
    moved = cv2.perspectiveTransform(quad.reshape(1, 4, 2).astype(np.float64), hom).reshape(4, 2)
    return moved if convex(moved) else None


def poster_ok(quad: Quad, label: np.ndarray, area0: float) -> bool:
    """Still a usable poster: mostly in frame, on the facade, not grown past 3x its first size."""
    h, w = label.shape
    inside = quad_fill(quad, (h, w))
    area = quad_area(quad)
    if area <= 0 or inside.sum() < 0.7 * area or area > 3.0 * area0:
        return False
    return float((label[inside] == BUILDING).mean()) >= 0.4


def occluders(labels: torch.Tensor) -> torch.Tensor:
    """(N,1,H,W) bool: pixels whose label is a foreground object that hides a poster behind it."""
    occ = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for c in OCCLUDERS:
        occ |= labels == c
    return occ.unsqueeze(1)


def render_posters(images: torch.Tensor, patch: torch.Tensor, quads: torch.Tensor, hidden: Optional[torch.Tensor],
                   capture: Optional[CaptureConfig], generator: Optional[torch.Generator]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``render_quads`` with occlusion: pixels in ``hidden`` (N,1,H,W) bool keep the frame and leave the mask."""
    patched, mask = render_quads(images, patch, quads, capture, generator)
    if hidden is None:
        return patched, mask
    hidden = hidden.to(images.device)
    return torch.where(hidden, images, patched), mask * (~hidden).to(mask.dtype)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """How physical EOT draws posters: scale and street-distance ranges, corner jitter, fallback."""
    scales: Tuple[float, float] = (0.4, 1.0)      # near-edge height / horizontal distance to the VP
    fractions: Tuple[float, ...] = FRACTIONS
    candidates: int = 12                          # candidate quads precomputed per frame
    min_cover: float = 0.6                        # fraction of a candidate on building pixels
    jitter: float = 0.04                          # corner jitter, fraction of the quad's size
    occlude: bool = True


class SceneSampler:
    """Per-frame facade posters for EOT over a fixed set of training frames (labels (N,H,W))."""

    def __init__(self, labels: torch.Tensor, cfg: SceneConfig = SceneConfig(), seed: int = 0) -> None:
        self.cfg = cfg
        self.labels = labels
        rng = np.random.default_rng(seed)
        self.quads: List[List[Quad]] = []
        for lab in labels.cpu().numpy():
            self.quads.append(self._candidates(lab, rng))

    def _candidates(self, lab: np.ndarray, rng: np.random.Generator) -> List[Quad]:
        w = lab.shape[1]
        bld = lab == BUILDING
        sides = [s for s, n in ((True, bld[:, : w // 2].sum()), (False, bld[:, w // 2:].sum())) if n > 0]
        if not sides:
            return []
        vp = vanishing_point(lab)
        found: List[Quad] = []
        for _ in range(4 * self.cfg.candidates):
            cand = poster_candidate(lab, float(rng.uniform(*self.cfg.scales)), float(rng.choice(self.cfg.fractions)),
                                    bool(rng.choice(sides)), vp)
            if cand is not None and cand[1] >= self.cfg.min_cover:
                found.append(cand[0])
            if len(found) >= self.cfg.candidates:
                break
        return found

    def coverage(self) -> float:
        """Fraction of frames with at least one facade poster (the rest fall back to a random placement)."""
        return sum(1 for q in self.quads if q) / max(len(self.quads), 1)

    def apply(self, images: torch.Tensor, patch: torch.Tensor, index: Sequence[int], capture: Optional[CaptureConfig],
              generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(patched, mask) for the frames ``index`` of the sampler's set (``images`` are those frames)."""
        n, _, H, W = images.shape
        fallback = sample_quads(n, (H, W), tuple(patch.shape[-2:]), Placement("random"), capture, generator)
        rows = []
        for i, k in enumerate(index):
            cands = self.quads[int(k)]
            if not cands:
                rows.append(fallback[i])
                continue
            q = torch.from_numpy(cands[int(torch.randint(len(cands), (1,), generator=generator))])
            size = q.amax(0) - q.amin(0)
            jit = (torch.rand(4, 2, generator=generator, dtype=torch.float64) * 2 - 1) * self.cfg.jitter * size
            moved = q + jit
            q = moved if convex(moved.numpy()) else q
            rows.append(torch.minimum(q.clamp(min=0), torch.tensor([W, H], dtype=torch.float64)))
        quads = torch.stack(rows)
        hidden = occluders(self.labels[list(index)].to(images.device)) if self.cfg.occlude else None
        cap = dataclasses.replace(capture, p_geometric=0.0) if capture is not None else None
        return render_posters(images, patch, quads, hidden, cap, generator)


__all__ = ["BUILDING", "OCCLUDERS", "ROAD", "Quad", "SceneConfig", "SceneSampler", "convex", "occluders",
           "place_poster", "poster_candidate", "poster_ok", "quad_area", "quad_fill", "render_posters",
           "scene_capture", "track_quad", "vanishing_point"]
