"""Patched calibration frames with ground-truth masks, from patches of several strengths.

Two source sets. ``beta`` (the paper's): the library's universal EOT patches (S/M/L, beta = 1) and its
beta-controlled patches with beta >= 0.5 -- adversarial patches of graded over-activation strength.
``simple`` (before a beta set exists): uniform-noise patches at the S/M/L sizes, crafted EOT patches,
and each crafted patch again at half contrast around mid-grey.
Every frame gets one source (round robin), a random placement inside the frame and, optionally, the
physical-capture simulation. With a ``SceneSampler`` (``placement`` 'scene' or 'mixed') the patch is
rendered instead as a poster on the frame's facade in perspective, occluded by foreground objects, as
the demo and the physical benchmark show it (all frames, or every other frame for 'mixed').
Seeded: the same call gives the same set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from realtime.attacks import CaptureConfig, Placement, apply_patch, load_patch_png, patch_size_for, random_patch
from realtime.attacks.scene import SceneSampler

PLACEMENTS = ("random", "scene", "mixed")


@dataclass
class PatchSource:
    name: str            # e.g. 'random-L', 'crafted-L', 'crafted-L@0.5'
    kind: str            # 'random' | 'crafted'
    patch: torch.Tensor  # (3,h,w) in [0,1]


def library_patches(directory: Path, model_name: str, fingerprint: str, kinds: Sequence[str] = ("eot", "beta"),
                    min_beta: float = 0.0) -> List[Tuple[str, torch.Tensor]]:
    """Crafted patches in ``directory`` whose JSON sidecar names this model's fingerprint and one of ``kinds``
    (universal EOT and beta-controlled by default; defense-aware patches are test attacks, not training data);
    beta patches below ``min_beta`` are skipped."""
    found = []
    for png in sorted(Path(directory).glob("*.png")):
        side = png.with_suffix(".json")
        if not side.is_file():
            continue
        meta = json.loads(side.read_text())
        if meta.get("fingerprint") != fingerprint or meta.get("kind") not in kinds:
            continue
        if meta.get("kind") == "beta" and float(meta.get("beta") or 0.0) < min_beta:
            continue
        patch, _ = load_patch_png(png)
        found.append((png.stem, patch))
    return found


def make_sources(input_hw: Tuple[int, int], crafted: Sequence[Tuple[str, torch.Tensor]], seed: int = 0,
                 half_contrast: bool = True, include_random: bool = True,
                 task: str = "segmentation") -> List[PatchSource]:
    """Random-noise S/M/L patches (the task's paper sizes) and each crafted patch, optionally again at half contrast."""
    g = torch.Generator().manual_seed(seed)
    sources = []
    if include_random:
        sources = [PatchSource(f"random-{s}", "random", random_patch(patch_size_for(s, input_hw, task), g))
                   for s in "SML"]
    for name, p in crafted:
        sources.append(PatchSource(name, "crafted", p))
        if half_contrast:
            sources.append(PatchSource(f"{name}@0.5", "crafted", 0.5 + 0.5 * (p - 0.5)))
    if not sources:
        raise ValueError("no patch sources: no random patches requested and no crafted patches found")
    return sources


@torch.no_grad()
def patch_frames(images_u8: torch.Tensor, sources: Sequence[PatchSource], seed: int = 0,
                 capture: Optional[CaptureConfig] = None, batch_size: int = 16,
                 scene: Optional[SceneSampler] = None, placement: str = "random"
                 ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """One patched twin per frame: ``(float frames (N,3,H,W), masks (N,1,H,W), source names)``.

    ``scene`` (built on these frames' labels) renders posters for ``placement`` 'scene' (every frame)
    or 'mixed' (odd frames; even frames keep the random placement); names of rendered twins end in '@scene'."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement != "random" and scene is None:
        raise ValueError(f"placement {placement!r} needs a SceneSampler over the frames' labels")
    g = torch.Generator().manual_seed(seed)
    out, masks, names = [], [], []
    for i in range(len(images_u8)):
        src = sources[i % len(sources)]
        x = images_u8[i:i + 1].float() / 255
        rendered = placement == "scene" or (placement == "mixed" and i % 2 == 1)
        if rendered:
            px, m = scene.apply(x, src.patch, [i], capture, g)
        else:
            px, m = apply_patch(x, src.patch, Placement(mode="random"), capture, generator=g)
        out.append(px)
        masks.append(m)
        names.append(src.name + ("@scene" if rendered else ""))
    return torch.cat(out), torch.cat(masks), names
