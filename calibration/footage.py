"""Calibration from a user's own unlabeled footage: frames from any live source, pseudo-labels, patches.

``read_footage`` takes frames from anything ``realtime.run --source`` accepts (a video file, a folder
or glob of images, a camera with a frame limit, a URL), resized to the model's input size.
``pseudo_labels`` are the model's own predictions on those clean frames: the "labels" an attacker
who wants to change the model's output optimises against, so no annotation is needed.
``craft_patches`` crafts universal EOT patches (axis-aligned placement with the physical-capture
simulation) against those pseudo-labels, one per requested size, within an optional time budget.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from realtime.attacks import CaptureConfig, Placement
from realtime.attacks.eot import EOTConfig, craft_universal_patch
from realtime.live.sources import SourceOptions, open_source


@dataclass(frozen=True)
class FootageConfig:
    """Where calibration frames come from and how many are kept."""
    source: str                                  # video, folder, glob, cameraN, URL
    max_frames: int = 400                        # frames kept (after ``every``)
    every: int = 1                               # keep every k-th frame (footage is highly redundant)
    size: Tuple[int, int] = (360, 480)           # (H, W) the model runs at
    fps: float = 10.0                            # image folders' frame rate (timestamps only)
    timeout: float = 10.0                        # seconds to wait for a network stream

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.every < 1:
            raise ValueError("--max-frames and --every must be >= 1")


def read_footage(cfg: FootageConfig, progress: bool = True) -> torch.Tensor:
    """(N,3,H,W) uint8 frames of ``cfg.source`` at ``cfg.size``; a clear error when it yields none."""
    src = open_source(cfg.source, SourceOptions(image_fps=cfg.fps, timeout=cfg.timeout))
    h, w = cfg.size
    frames: List[np.ndarray] = []
    bar = tqdm(total=cfg.max_frames, desc=f"frames from {src.name}", unit="frame", disable=not progress)
    try:
        for i, frame in enumerate(src):
            if i % cfg.every:
                continue
            img = frame.image
            if img.shape[:2] != (h, w):
                down = h * w < img.shape[0] * img.shape[1]
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)
            frames.append(np.ascontiguousarray(img))
            bar.update(1)
            if len(frames) >= cfg.max_frames:
                break
    finally:
        bar.close()
        src.close()
    if not frames:
        raise ValueError(f"--frames {cfg.source}: the source gave no frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def pseudo_labels(model: torch.nn.Module, images_u8: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N,H,W) uint8 class maps: the model's own argmax on the clean frames."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(images_u8), batch_size):
        x = images_u8[s:s + batch_size].to(dev).float() / 255
        out.append(model(x).argmax(1).to(torch.uint8).cpu())
    return torch.cat(out)


def craft_patches(model: torch.nn.Module, images_u8: torch.Tensor, labels_u8: torch.Tensor,
                  sizes: Sequence[str], steps: int, device: torch.device, seed: int = 0,
                  time_budget: Optional[float] = None, batch_size: int = 8,
                  progress: bool = True, prefix: str = "pseudo-eot") -> List[Tuple[str, torch.Tensor, int]]:
    """One universal EOT patch per size against ``labels_u8`` (pseudo-labels, or true labels when there are
    any): ``[(f"{prefix}-{size}", patch (3,h,w), steps run)]``.

    With ``time_budget`` (seconds for all sizes) each patch first runs two timed steps, then as many as
    its share of the budget allows (at most ``steps``), continuing from its own checkpoint."""
    found = []
    share = time_budget / len(sizes) if time_budget else None
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(sizes):
            cfg = EOTConfig(size=size, steps=steps, batch_size=batch_size, seed=seed + i,
                            capture=CaptureConfig.physical(), placement=Placement("random"))
            ckpt = Path(tmp) / f"{size}.ckpt.pt"
            if share is not None:
                probe = min(2, steps)
                t0 = time.perf_counter()
                craft_universal_patch(model, images_u8, labels_u8, replace(cfg, steps=probe), device,
                                      progress=False, checkpoint=ckpt)
                per_step = (time.perf_counter() - t0) / probe
                cfg = replace(cfg, steps=max(probe, min(steps, int(share / max(per_step, 1e-6)))))
            patch, _history = craft_universal_patch(model, images_u8, labels_u8, cfg, device, progress=progress,
                                                    checkpoint=ckpt)
            found.append((f"{prefix}-{size}", patch, cfg.steps))
    return found


__all__ = ["FootageConfig", "craft_patches", "pseudo_labels", "read_footage"]
