"""Planar motion between two frames: corners tracked with pyramidal Lucas-Kanade, a RANSAC homography.

Shared by the poster renderer (a facade moves by a homography as the car drives past,
``realtime.attacks.scene``) and the live pipeline's motion-compensated mask propagation
(``realtime.live.motion``).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np


def track_homography(prev: np.ndarray, cur: np.ndarray, roi: np.ndarray, min_points: int,
                     max_corners: int = 300) -> Optional[np.ndarray]:
    """3x3 homography from ``prev`` to ``cur`` (HxW uint8 gray) fitted on corners inside ``roi`` (HxW uint8,
    255 = use), forward-backward checked (< 1 px); None with fewer than ``min_points`` corners or inliers."""
    p0 = cv2.goodFeaturesToTrack(prev, maxCorners=max_corners, qualityLevel=0.01, minDistance=5, mask=roi)
    if p0 is None or len(p0) < min_points:
        return None
    p1, st, _ = cv2.calcOpticalFlowPyrLK(prev, cur, p0, None, winSize=(21, 21), maxLevel=3)
    back, st2, _ = cv2.calcOpticalFlowPyrLK(cur, prev, p1, None, winSize=(21, 21), maxLevel=3)
    ok = (st.ravel() == 1) & (st2.ravel() == 1) & (np.linalg.norm((back - p0).reshape(-1, 2), axis=1) < 1.0)
    if ok.sum() < min_points:
        return None
    hom, inl = cv2.findHomography(p0[ok], p1[ok], cv2.RANSAC, 2.0)
    if hom is None or inl is None or int(inl.sum()) < min_points or not np.isfinite(hom).all():
        return None
    return hom


__all__ = ["track_homography"]
