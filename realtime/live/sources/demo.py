"""The ``demo`` source: a CamVid drive with a crafted patch printed as a poster on a building facade.

What it does, per frame of the sequence (default: val ``0016E5``, 101 frames sampled at 15 Hz):

1. Frames outside ``[patch_start, patch_start + patch_frames)`` are passed through clean, so a run
   shows both the clean behaviour (no alarm expected) and the attacked one.
2. Placement ("a plausible surface"): the side of the road with more ``building`` pixels is chosen;
   the vanishing point is estimated from the top of the ``road`` region; candidate posters are
   quadrilaterals whose top and bottom edges converge to that vanishing point (a plane parallel to the
   driving direction) and whose bottom sits just above the facade's base line; the candidate covering
   the most building pixels wins.
3. Motion ("moving with the scene"): a facade is a plane, so the poster's image motion between two
   frames is a homography. It is estimated from corners tracked (pyramidal Lucas-Kanade, RANSAC) on
   the building pixels around the poster in the CLEAN frames, and applied to the poster's corners:
   the poster grows and slides outwards as the car drives past, like a real print. When tracking
   fails (too few inliers, as with 1 Hz sequences), the poster leaves the frame or grows too large,
   a new poster is placed from the label map (the next poster along the street).
4. Capture: the patch is warped onto the quad and passed through the physical-capture simulation
   (lighting, blur, noise, JPEG; one draw per poster so a poster keeps its lighting); pixels whose
   label is a foreground object (pole, sign, tree, fence, car, pedestrian, cyclist) occlude it.
   The ground-truth patch mask is exactly the composited pixels.

Frames and labels come from CamVid when the dataset is found (``--data``, ``$REALTIME_DATA``,
``../shared``); otherwise, for the default sequence, from the clip embedded in the repository
(``demo_clip.py``: H.264 frames + packed label maps), so the demo runs on a fresh machine. The same
renderer runs on either; ``DemoSource.info`` (and the run summary) says which one was used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from realtime.attacks import load_patch_png, render_quads
from realtime.attacks.scene import OCCLUDERS, Quad, place_poster, poster_ok, quad_area, scene_capture, track_quad
from realtime.data import DataNotFoundError, resolve_data_dir
from realtime.data.paths import ENV_VAR, lookup_disabled
from realtime.live.sources.base import Frame, Source, SourceError
from realtime.live.sources.camvid import CAMVID_VIDEO_FPS, open_sequence
from realtime.live.sources.demo_clip import CLIP_DIR, CLIP_SEQUENCE, CLIP_SPLIT, ClipView

LIBRARY = Path(__file__).resolve().parents[2] / "attacks" / "library"


@dataclass(frozen=True)
class DemoConfig:
    """Which sequence, which patch, when it is visible, and how it is rendered."""
    sequence: str = "0016E5"
    split: Optional[str] = "val"             # None: the first of val/train/test holding the sequence
    model: str = "ddrnet23_slim"             # picks the library patch crafted against this model
    patch: Optional[str] = None              # explicit patch PNG (overrides ``model``)
    patch_start: int = 30                    # first patched frame (frames before are clean)
    patch_frames: int = 55                   # patched frames; the tail after them is clean again
    poster_scale: float = 0.8                # near-edge height / horizontal distance to the VP
    occlude: bool = True
    seed: int = 0
    min_inliers: int = 12

    def patch_path(self) -> Path:
        if self.patch:
            return Path(self.patch)
        return LIBRARY / f"{self.model}_eot_L.png"

    def patched(self, k: int) -> bool:
        return self.patch_start <= k < self.patch_start + self.patch_frames

    def track_key(self) -> dict:
        """The settings the poster geometry depends on (not the patch, seed or occlusion)."""
        return {"sequence": self.sequence, "patch_start": self.patch_start, "patch_frames": self.patch_frames,
                "poster_scale": self.poster_scale, "min_inliers": self.min_inliers}


def open_demo_view(cfg: DemoConfig, data: Optional[str]) -> Tuple[object, dict]:
    """The frames to render on and where they came from: CamVid if found, else the embedded clip.

    Only the default lookup falls back (an explicit ``--data`` that is wrong stays an error), and only
    for the sequence the clip holds (``demo:OTHER`` needs the dataset). A ``$REALTIME_DATA`` naming no
    CamVid directory stays an error too, unless ``$REALTIME_NO_DATA`` switches the lookup off.
    """
    explicit = data is not None or (bool(os.environ.get(ENV_VAR)) and not lookup_disabled())
    if not explicit and cfg.sequence == CLIP_SEQUENCE and cfg.split in (None, CLIP_SPLIT):
        try:
            resolve_data_dir(None)
        except DataNotFoundError:
            view = ClipView()
            crf = view.meta.get("video", {}).get("crf")
            track = view.poster_track(cfg.track_key()) is not None
            how = "the full renderer's recorded poster track" if track else "posters tracked on the decoded frames"
            return view, {"demo_frames": "embedded clip", "path": str(CLIP_DIR), "recorded_track": track,
                          "note": f"embedded clip {CLIP_SEQUENCE}@{CLIP_SPLIT} (CamVid not found: H.264 crf {crf} frames, "
                                  f"packed labels, {how}; full dataset: see README)"}
    view, split = open_sequence(cfg.sequence, cfg.split, data)
    root = getattr(getattr(view, "dataset", None), "root", None)
    return view, {"demo_frames": "camvid", "path": str(root),
                  "note": f"CamVid {cfg.sequence}@{split} from {root} (full renderer on the original frames)"}


class DemoSource(Source):
    """CamVid frames with the poster composited on the patched segment; ``gt_mask`` on every frame."""

    live = False

    def __init__(self, cfg: DemoConfig = DemoConfig(), data: Optional[str] = None) -> None:
        self.cfg = cfg
        self.view, self.info = open_demo_view(cfg, data)
        path = cfg.patch_path()
        if not path.is_file():
            raise SourceError(f"demo patch {path} not found (pass --patch PNG)")
        self.patch, _ = load_patch_png(path)
        numbers = self.view.frames
        self.name = f"demo-{cfg.sequence}"
        self.length = len(numbers)
        step = float(np.median(np.diff(numbers))) if len(numbers) > 1 else CAMVID_VIDEO_FPS
        self.fps = CAMVID_VIDEO_FPS / max(step, 1.0)
        self._first = numbers[0]
        self.posters = 0                      # posters placed so far (respawns + 1)
        self.quads: List[Optional[Quad]] = []

    def _composite(self, img: np.ndarray, label: np.ndarray, quad: Quad) -> Tuple[np.ndarray, np.ndarray]:
        """Render the captured patch onto the quad (only inside its bounding box, for speed)."""
        h, w = label.shape
        x0, y0 = np.clip(np.floor(quad.min(0)).astype(int) - 2, 0, None)
        x1, y1 = np.minimum(np.ceil(quad.max(0)).astype(int) + 2, (w, h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return img, np.zeros((h, w), bool)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.posters)
        crop = torch.from_numpy(img[y0:y1, x0:x1]).permute(2, 0, 1)[None].float().div(255)
        q = torch.from_numpy(quad - np.array([x0, y0], np.float64))[None]
        patched, mask = render_quads(crop, self.patch, q, scene_capture(), gen)
        out = patched[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = mask[0, 0].numpy() > 0.5
        if self.cfg.occlude:
            m &= ~np.isin(label, OCCLUDERS)
        img = img.copy()
        img[y0:y1, x0:x1][m[y0:y1, x0:x1]] = out[m[y0:y1, x0:x1]]
        return img, m

    def scenes(self) -> Iterator[Tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """``(k, camvid frame, clean image, shown image, gt mask, label)`` per frame: the clean twin of
        every rendered frame, for benchmarks that score clean, attacked and defended side by side."""
        # The embedded clip carries the full renderer's poster track (quads tracked on the original
        # frames) for the default settings; replaying it keeps the geometry identical to a CamVid run.
        replay = getattr(self.view, "poster_track", lambda key: None)(self.cfg.track_key())
        quad: Optional[Quad] = None
        area0 = 0.0
        prev: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self.poster_ids = []
        for k, (number, img, lab) in enumerate(self.view):
            gt = np.zeros(lab.shape, bool)
            shown = img
            if self.cfg.patched(k) and replay is not None:
                q, self.posters = replay[k]
                quad = None if q is None else np.asarray(q, np.float64)
                if quad is not None:
                    shown, gt = self._composite(img, lab, quad)
            elif self.cfg.patched(k):
                if quad is not None and prev is not None:
                    quad = track_quad(prev[0], img, prev[1], quad, self.cfg.min_inliers)
                if quad is None or not poster_ok(quad, lab, area0):
                    quad = place_poster(lab, self.cfg.poster_scale)
                    if quad is not None:
                        self.posters += 1
                        area0 = quad_area(quad)
                if quad is not None:
                    shown, gt = self._composite(img, lab, quad)
            else:
                quad = None
            self.quads.append(None if quad is None else quad.copy())
            self.poster_ids.append(self.posters)
            prev = (img, lab)
            yield k, int(number), img, shown, gt, lab

    def __iter__(self) -> Iterator[Frame]:
        for k, number, _clean, shown, gt, lab in self.scenes():
            yield Frame(index=k, image=np.ascontiguousarray(shown),
                        timestamp=(number - self._first) / CAMVID_VIDEO_FPS, gt_mask=gt, label=lab,
                        meta={"camvid_frame": number, "patched": bool(gt.any())})
