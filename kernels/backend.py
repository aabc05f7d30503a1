"""``ZMask(heatmap_backend=heatmap_backend(mode))``: when the fused kernels stand in for the reference.

* ``"fused"``: always the kernels; a clear error when they cannot run (no CUDA/CuPy at construction,
  CPU taps, or autograd needed at call time: the kernels have no backward).
* ``"auto"``: the kernels only for CUDA taps without autograd, when they are available AND a one-time
  parity check against the reference passes for that (device, dtypes); otherwise the reference, with
  one warning when the kernels were expected but failed or disagreed.
The reference stays the default and the only CPU path.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from realtime.defenses.zmask import Detection

from .fused import FusedZMask
from .launch import DTYPES
from .runtime import KernelsUnavailable, available

BACKENDS = ("reference", "fused", "auto")
# Self-check tolerance (normwise relative error). The reference computes fp16 taps in fp16.
SELF_CHECK_TOL = {torch.float32: 1e-3, torch.float16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are all zeros)."""
    a, b = a.detach().float(), b.detach().float()
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def heatmap_backend(mode: str) -> Union[str, Callable[[Any], "FusedRouter"]]:
    """What to pass as ``ZMask(heatmap_backend=...)`` for ``mode`` in ``BACKENDS``: ``"reference"`` as is,
    else a factory that attaches a ``FusedRouter`` to the ZMask (raising at once when ``"fused"`` cannot run)."""
    if mode not in BACKENDS:
        raise ValueError(f"heatmap_backend must be one of {', '.join(BACKENDS)}, got {mode!r}")
    if mode == "reference":
        return mode
    return functools.partial(FusedRouter, mode=mode)


class FusedRouter:
    """Decides per call whether a ZMask uses the fused kernels, and runs them."""

    def __init__(self, zmask: Any, mode: str) -> None:
        if mode not in ("fused", "auto"):
            raise ValueError(f"FusedRouter mode must be 'fused' or 'auto', got {mode!r}")
        self._zm = weakref.ref(zmask)
        self.mode = mode
        self._engine: Optional[FusedZMask] = None
        self.verdicts: Dict[Tuple[Any, ...], bool] = {}   # auto: (device, dtypes) -> self-check passed
        self.messages: List[str] = []
        self._available: Optional[Tuple[bool, str]] = None
        if mode == "fused":
            ok, why = available()
            if not ok:
                raise KernelsUnavailable(f"heatmap_backend='fused' needs the fused CUDA kernels: {why}")

    @property
    def zmask(self) -> Any:
        zm = self._zm()
        if zm is None:
            raise RuntimeError("the ZMask this router belongs to no longer exists")
        return zm

    def engine(self) -> FusedZMask:
        zm = self.zmask
        if self._engine is None or self._engine.stats is not zm.stats or self._engine.cfg != zm.cfg:
            self._engine = FusedZMask(zm.cfg, zm.stats)
        return self._engine

    def eligible(self, taps: Dict[str, torch.Tensor], with_fusion: bool) -> Tuple[bool, str]:
        """(True, "") when these taps can go through the kernels, else (False, why)."""
        zm = self.zmask
        maps = [taps.get(n) for n in zm.cfg.layers]
        if any(not isinstance(m, torch.Tensor) for m in maps):
            return False, "taps missing for some hooked layers"
        if not all(m.is_cuda for m in maps):
            return False, "taps are not on a CUDA device"
        if any(m.dtype not in DTYPES for m in maps):
            return False, f"tap dtypes {sorted({str(m.dtype) for m in maps})} (kernels read float32/float16)"
        if torch.is_grad_enabled():
            if any(m.requires_grad for m in maps):
                return False, "taps require grad (the kernels have no backward)"
            if with_fusion and any(p.requires_grad for p in zm.fusion.parameters()):
                return False, "fusion parameters require grad (the kernels have no backward)"
        return True, ""

    def use(self, taps: Dict[str, torch.Tensor], with_fusion: bool) -> bool:
        ok, why = self.eligible(taps, with_fusion)
        if self.mode == "fused":
            if not ok:
                if with_fusion and self.eligible(taps, False)[0]:
                    return False     # fused heatmaps, then the (differentiable) torch fusion block
                raise RuntimeError(f"heatmap_backend='fused' cannot run here: {why}. Run under torch.no_grad() / "
                                   "torch.inference_mode() with CUDA taps, or use heatmap_backend='auto'")
            return True
        if not ok:
            return False
        if self._available is None:
            self._available = available()
        avail, reason = self._available
        if not avail:
            self._warn(f"fused kernels unavailable ({reason}); using the reference heatmaps")
            return False
        key = (taps[self.zmask.cfg.layers[0]].device, tuple(taps[n].dtype for n in self.zmask.cfg.layers))
        if key not in self.verdicts:
            self.verdicts[key] = self._self_check(taps)
        return self.verdicts[key]

    def _self_check(self, taps: Dict[str, torch.Tensor]) -> bool:
        """Fused vs reference on these taps: heatmaps, soft mask and score within SELF_CHECK_TOL."""
        zm = self.zmask
        tol = max(SELF_CHECK_TOL[taps[n].dtype] for n in zm.cfg.layers)
        try:
            with torch.no_grad():
                det = self.engine().detect(taps, zm.cfg.spr.work_size, zm.fusion, zm.cfg.lambda0,
                                           zm.cfg.mask_threshold)
                h_s, h_d = zm.reference_heatmaps(taps)
                soft, score = zm.fusion(h_s, h_d)
                errs = {"h_s": rel_err(det.h_s, h_s), "h_d": rel_err(det.h_d, h_d),
                        "soft_mask": rel_err(det.soft_mask, soft), "score": rel_err(det.score, score)}
        except Exception as exc:  # noqa: BLE001 - any kernel failure means: stay on the reference
            self._warn(f"fused kernels failed their first run ({type(exc).__name__}: {exc}); "
                       "using the reference heatmaps")
            return False
        bad = {k: v for k, v in errs.items() if not v <= tol}
        if bad:
            self._warn(f"fused kernels disagree with the reference (relative errors {bad}, tolerance {tol}); "
                       "using the reference heatmaps")
            return False
        return True

    def _warn(self, msg: str) -> None:
        if msg not in self.messages:
            self.messages.append(msg)
            if len(self.messages) == 1:
                warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _out_dtype(self, taps: Dict[str, torch.Tensor]) -> torch.dtype:
        """The reference's heatmap dtype: the taps' promoted dtype."""
        return functools.reduce(torch.promote_types, (taps[n].dtype for n in self.zmask.cfg.layers))

    def heatmaps(self, taps: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        h_s, h_d = self.engine().heatmaps(taps)
        dt = self._out_dtype(taps)
        return h_s.to(dt), h_d.to(dt)

    def detect(self, taps: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Detection:
        zm = self.zmask
        det = self.engine().detect(taps, size, zm.fusion, zm.cfg.lambda0, zm.cfg.mask_threshold)
        dt = self._out_dtype(taps)
        return det._replace(h_s=det.h_s.to(dt), h_d=det.h_d.to(dt))


__all__ = ["BACKENDS", "FusedRouter", "heatmap_backend", "SELF_CHECK_TOL", "rel_err"]
