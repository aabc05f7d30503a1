"""Patch conditions of the robustness benchmark and the one deterministic placement per frame.

Conditions come from the patch library (``realtime/attacks/library/<model>_<name>.png``): the clean
frames (``none``), the paper's Table 4 set (``random_L``, ``eot_S``, ``eot_M``, ``eot_L``), for detectors
``apricot_L`` (false-detection patch), the
beta sweep (``beta0.1_L`` ... ``beta0.9_L``) and any defense-aware patches (``advmask_a<alpha>_L``,
``advflag_a<alpha>_L``). Missing library files are skipped when conditions are not named explicitly.

Placement: frame ``i`` gets its patch where a CPU generator seeded with ``seed * 100_000 + i`` puts it
(``Placement("random")``, as in ``realtime.attacks.evaluate``). The draw is a relative position, so
every condition, every defense, any ``--batch`` and any ``--limit`` see the same spot for frame ``i``
(patches of different sizes share the same relative position). Capture simulation is off by default
(digital paste, the convention of ``realtime.attacks.evaluate`` and ``benchmarks/results/attacks.md``);
``physical`` applies ``CaptureConfig.physical()`` with the same per-frame generator.
"""
from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from realtime.attacks.apply import CaptureConfig, Placement, apply_patch, load_patch_png
from realtime.models.registry import model_slug

LIBRARY = Path(__file__).resolve().parents[1] / "realtime" / "attacks" / "library"
TABLE4 = ("none", "random_L", "eot_S", "eot_M", "eot_L")
DETECTION_EXTRA = ("apricot_L",)               # detector-only: a patch that makes false detections appear
_BETA_RE = re.compile(r"^beta(?P<beta>\d+(?:\.\d+)?)_L$")
_ADV_RE = re.compile(r"^adv(?P<kind>mask|flag)_a(?P<alpha>\d+(?:\.\d+)?)_L$")
CAPTURES = ("none", "physical")


@dataclass
class Condition:
    """One test condition: a patch (None for clean frames) and what it is."""
    name: str
    kind: str                                  # clean / random / eot / beta / adv-mask / adv-flag
    patch: Optional[torch.Tensor] = None       # (3,h,w) in [0,1]
    path: Optional[str] = None
    beta: Optional[float] = None
    alpha: Optional[float] = None
    sha256: Optional[str] = None               # of the PNG, so a resumed run notices a re-crafted patch
    meta: Dict = field(default_factory=dict)

    def describe(self) -> Dict:
        """JSON-friendly description (no pixels)."""
        hw = list(self.patch.shape[1:]) if self.patch is not None else None
        keep = ("kind", "fingerprint", "steps", "seed", "split", "defense_aware", "alpha", "beta", "model")
        return {"kind": self.kind, "path": self.path, "hw": hw, "beta": self.beta, "alpha": self.alpha,
                "sha256": self.sha256, "patch_meta": {k: self.meta[k] for k in keep if k in self.meta}}


def _order(name: str) -> Tuple:
    if name in TABLE4:
        return (0, TABLE4.index(name), 0.0)
    if name in DETECTION_EXTRA:
        return (0, len(TABLE4) + DETECTION_EXTRA.index(name), 0.0)
    m = _BETA_RE.match(name)
    if m:
        return (1, 0, float(m["beta"]))
    m = _ADV_RE.match(name)
    if m:
        return (2, 0 if m["kind"] == "mask" else 1, float(m["alpha"]))
    return (3, 0, 0.0)


def known_condition(name: str) -> bool:
    """Whether ``name`` is a condition this benchmark knows how to read from the library."""
    return name in TABLE4 or name in DETECTION_EXTRA or bool(_BETA_RE.match(name) or _ADV_RE.match(name))


def library_conditions(model: str, library: Path = LIBRARY) -> List[str]:
    """Condition names with a patch file for ``model`` in ``library`` (plus ``none``), in report order."""
    found = ["none"]
    for png in Path(library).glob(f"{model_slug(model)}_*.png"):
        name = png.stem[len(model) + 1:]
        if known_condition(name) and name != "none":
            found.append(name)
    return sorted(found, key=_order)


def load_condition(model: str, name: str, library: Path = LIBRARY) -> Condition:
    """Read condition ``name`` for ``model``; unknown names or missing files raise with what exists."""
    if name == "none":
        return Condition("none", "clean")
    if not known_condition(name):
        raise KeyError(f"unknown condition {name!r}; known: {', '.join(TABLE4 + DETECTION_EXTRA)}, beta<b>_L, "
                       f"advmask_a<alpha>_L, advflag_a<alpha>_L")
    path = Path(library) / f"{model_slug(model)}_{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"no patch {path} for condition {name!r}; available for {model}: "
                                f"{', '.join(library_conditions(model, library))}")
    patch, meta = load_patch_png(path)
    beta = _BETA_RE.match(name)
    adv = _ADV_RE.match(name)
    kind = name.split("_")[0] if name.startswith(("random", "eot", "apricot")) else (
        "beta" if beta else f"adv-{adv['kind']}")
    alpha = float(adv["alpha"]) if adv else None
    return Condition(name, kind, patch, str(path), float(beta["beta"]) if beta else None, alpha,
                     patch_sha256(path), meta)


def patch_sha256(path: Path) -> str:
    """Short content hash of a patch PNG: a resumed run notices a re-crafted patch."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def resolve_conditions(model: str, requested: Optional[Sequence[str]], fingerprint: str,
                       library: Path = LIBRARY) -> List[Condition]:
    """Conditions to run: ``requested`` (each must exist) or everything in the library; ``none`` first.

    ``none`` is always included: its scores are the negatives of every detection ROC. A patch crafted on
    other weights (fingerprint mismatch) is kept but reported on stderr as a transfer attack.
    """
    names = list(requested) if requested else library_conditions(model, library)
    if len(set(names)) != len(names):
        raise ValueError(f"condition listed twice in {names}")
    if "none" not in names:
        names = ["none"] + names
    conds = [load_condition(model, n, library) for n in sorted(names, key=_order)]
    for c in conds:
        fp = c.meta.get("fingerprint")
        if c.patch is not None and fp not in (None, fingerprint):
            print(f"warning: {c.path} was crafted on weights {fp}, evaluating {model} ({fingerprint}): "
                  "a transfer attack", file=sys.stderr)
    return conds


def capture_config(name: str) -> Optional[CaptureConfig]:
    """``none`` -> digital paste (None), ``physical`` -> ``CaptureConfig.physical()``."""
    if name not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {name!r}")
    return CaptureConfig.physical() if name == "physical" else None


def frame_generator(seed: int, frame_index: int) -> torch.Generator:
    """The CPU generator that decides where frame ``frame_index``'s patch goes."""
    return torch.Generator().manual_seed(int(seed) * 100_000 + int(frame_index))


def paste(x: torch.Tensor, patch: Optional[torch.Tensor], frame_indices: Sequence[int], seed: int,
          capture: Optional[CaptureConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paste ``patch`` into each frame of ``x`` (N,3,H,W) at its per-frame seeded place.

    Returns ``(patched, gt)`` with ``gt`` the exact (N,1,H,W) float patch mask; ``patch=None`` returns
    ``x`` and an all-zero mask.
    """
    if len(frame_indices) != x.shape[0]:
        raise ValueError(f"{len(frame_indices)} frame indices for a batch of {x.shape[0]}")
    if patch is None:
        return x, torch.zeros(x.shape[0], 1, *x.shape[-2:], device=x.device, dtype=x.dtype)
    outs, masks = [], []
    for k, i in enumerate(frame_indices):
        p, m = apply_patch(x[k:k + 1], patch, Placement("random"), capture, frame_generator(seed, i))
        outs.append(p)
        masks.append(m)
    return torch.cat(outs), torch.cat(masks)


__all__ = ["CAPTURES", "Condition", "patch_sha256", "DETECTION_EXTRA", "LIBRARY", "TABLE4", "capture_config", "frame_generator",
           "known_condition", "library_conditions", "load_condition", "paste", "resolve_conditions"]
