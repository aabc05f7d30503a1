"""Frames for the latency benchmark: clean CamVid val frames (or synthetic ones) and their attacked twins.

Frames are kept on the host as uint8 HxWx3 at the benchmark resolution, like decoded video, so the
timed preprocess stage (upload + normalisation) is the same work the live pipeline does. The attacked
twin of a frame carries the model's universal EOT patch (size L, scaled to the resolution) at a fixed
place; consecutive frames keep consecutive order, so the temporal path sees a video with a static patch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from realtime.attacks.apply import load_patch_png, patch_size_for

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "realtime" / "attacks" / "library"


@dataclass
class FrameSet:
    """Clean and attacked uint8 frames (same count, same order) and where they came from."""
    clean: List[np.ndarray]
    attacked: List[np.ndarray]
    source: str                       # "camvid val (0016E5 ...)" or "synthetic (...)"
    patch: str                        # patch file and placement, for the record
    screened: Optional[str] = None    # how attacked frames were screened, if they were


def resize_rgb(img: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """uint8 HxWx3 resized to ``hw`` (area when shrinking, linear when enlarging)."""
    h, w = hw
    if img.shape[:2] == (h, w):
        return np.ascontiguousarray(img)
    down = h * w < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)


def synthetic_frames(n: int, hw: Tuple[int, int], seed: int = 0) -> List[np.ndarray]:
    """Smooth random colour fields (low-frequency noise upsampled), uint8 HxWx3; deterministic per seed."""
    rng = np.random.default_rng(seed)
    return [resize_rgb(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), hw) for _ in range(n)]


def camvid_frames(n: int, hw: Tuple[int, int], data: Optional[str] = None) -> Tuple[List[np.ndarray], str]:
    """The first ``n`` CamVid val frames in sequence order, resized; raises DataNotFoundError without data."""
    from realtime.data import CamVid
    ds = CamVid(data, "val")
    if len(ds) == 0:
        raise FileNotFoundError(f"CamVid val in {ds.root} has no frames")
    k = min(n, len(ds))
    frames = [resize_rgb(ds.load(i)[0], hw) for i in range(k)]
    return frames, f"camvid val {', '.join(ds.sequences)} (first {k} frames, {ds.root})"


def load_frames(n: int, hw: Tuple[int, int], data: Optional[str] = None, synthetic: bool = False
                ) -> Tuple[List[np.ndarray], str]:
    """CamVid val frames when the data is found (and ``synthetic`` is False), else synthetic ones."""
    if not synthetic:
        try:
            return camvid_frames(n, hw, data)
        except FileNotFoundError as exc:            # DataNotFoundError is a FileNotFoundError
            if data is not None:
                raise
            reason = f"CamVid not found: {' '.join(str(exc).split())[:120]}"
    else:
        reason = "--synthetic"
    return synthetic_frames(n, hw), f"synthetic smooth noise ({reason})"


def patch_for(model_name: str, hw: Tuple[int, int], library: Path = LIBRARY) -> Tuple[np.ndarray, str]:
    """The model's EOT L patch as uint8 hxwx3, resized to the L size at ``hw``."""
    path = library / f"{model_name}_eot_L.png"
    patch, _meta = load_patch_png(path)
    ph, pw = patch_size_for("L", hw)
    p = F.interpolate(patch[None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
    arr = p.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(arr), str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def paste(frame: np.ndarray, patch: np.ndarray, top_left: Tuple[int, int]) -> np.ndarray:
    """A copy of ``frame`` with ``patch`` pasted at ``top_left`` (y, x); the patch must fit."""
    y, x = top_left
    ph, pw = patch.shape[:2]
    if y < 0 or x < 0 or y + ph > frame.shape[0] or x + pw > frame.shape[1]:
        raise ValueError(f"patch {ph}x{pw} at {top_left} does not fit a {frame.shape[0]}x{frame.shape[1]} frame")
    out = frame.copy()
    out[y:y + ph, x:x + pw] = patch
    return out


def centre_place(hw: Tuple[int, int], patch_hw: Tuple[int, int]) -> Tuple[int, int]:
    """Top-left of a patch centred horizontally, a little below the frame's middle (on the road)."""
    return (max(0, min(hw[0] - patch_hw[0], int(hw[0] * 0.55) - patch_hw[0] // 2)),
            max(0, (hw[1] - patch_hw[1]) // 2))


def build_frames(model_name: str, n: int, hw: Tuple[int, int], data: Optional[str] = None,
                 synthetic: bool = False, library: Path = LIBRARY) -> FrameSet:
    """``n`` clean frames and their attacked twins at ``hw``."""
    clean, source = load_frames(n, hw, data, synthetic)
    patch, name = patch_for(model_name, hw, library)
    where = centre_place(hw, patch.shape[:2])
    attacked = [paste(f, patch, where) for f in clean]
    return FrameSet(clean, attacked, source, f"{name} as {patch.shape[0]}x{patch.shape[1]} at (y, x) = {where}")


def screen_attacked(fs: FrameSet, flags: Callable[[np.ndarray], bool], keep: int) -> FrameSet:
    """Keep (in order) up to ``keep`` attacked frames that ``flags`` flags, with their clean twins.

    Used so the attacked measurement exercises the second pass; when nothing is flagged the set is
    returned unchanged and ``screened`` says so."""
    hit = [i for i, a in enumerate(fs.attacked) if flags(a)]
    if not hit:
        return FrameSet(fs.clean[:keep], fs.attacked[:keep], fs.source, fs.patch,
                        f"0 of {len(fs.attacked)} attacked candidates flagged by Z-Mask: attacked frames "
                        f"are NOT second-pass frames")
    kept = hit[:keep]
    return FrameSet([fs.clean[i] for i in kept], [fs.attacked[i] for i in kept], fs.source, fs.patch,
                    f"Z-Mask flagged {len(hit)} of {len(fs.attacked)} attacked candidates; the first "
                    f"{len(kept)} flagged ones (and their clean twins) are used, in order")


__all__ = ["FrameSet", "build_frames", "camvid_frames", "centre_place", "load_frames", "paste", "patch_for",
           "resize_rgb", "screen_attacked", "synthetic_frames"]
