"""``ZMask(heatmap_backend=heatmap_backend(mode))``: when the fused kernels stand in for the reference.

* ``"fused"``: always the kernels; a clear error when they cannot run (no CUDA/CuPy at construction,
  CPU taps, or autograd needed at call time: the kernels have no backward).
* ``"auto"``: the kernels only for CUDA taps without autograd, when they are available AND a one-time
  parity check against the reference passes for that (device, dtypes); otherwise the reference, with
  one warning when the kernels were expected but failed or disagreed.

CPU float32 taps (inference, 'same' SPR mode) go to the CPU kernel (``kernels.cpu``: the SPR terms in
C, then the cascades and fusion block in a small C tail; the flag and keep-mask in the reference's torch code)
under the same two rules: ``"fused"`` uses
it or fails clearly, ``"auto"`` after the same one-time parity check, else the reference.
The plain-torch reference stays the default (``"reference"``) and the oracle.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from realtime.defenses import ChannelStats
from realtime.defenses.zmask import Detection

from .cpu import CpuKernelUnavailable, CpuMeanAbsZ, CpuZMask, cpu_available
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
    return RouterFactory(mode)


class RouterFactory:
    """``ZMask(heatmap_backend=RouterFactory(mode))`` attaches a ``FusedRouter``; ``cpu_kernel_ready()`` tells a
    defense builder that CPU taps will go through the CPU kernel (so an engine's plain tapped graph plus the
    kernel is preferred to computing the heatmaps inside the engine's own graph)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, zmask: Any) -> "FusedRouter":
        return FusedRouter(zmask, mode=self.mode)

    def cpu_kernel_ready(self) -> bool:
        return cpu_available()[0]

    def __repr__(self) -> str:
        return f"RouterFactory({self.mode!r})"


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
        self._cpu: Optional[CpuZMask] = None
        self.cpu_verdict: Optional[bool] = None         # auto: the CPU kernel's one-time self-check
        self.cpu_tail_verdict: Optional[bool] = None    # auto: the same for its cascades + fusion (the C tail)
        self._mean_abs: Dict[int, Tuple[ChannelStats, CpuMeanAbsZ, Optional[bool]]] = {}   # id(stats) -> kernel, verdict
        if mode == "fused":
            ok, why = available()
            cpu_ok, cpu_why = cpu_available()
            if not ok and not cpu_ok:
                raise KernelsUnavailable(f"heatmap_backend='fused' needs the fused CUDA kernels ({why}) or the CPU "
                                         f"kernel ({cpu_why})")

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
        if self.on_cpu(taps):
            return self._use_cpu(taps, with_fusion)
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

    # ------------------------------------------------------------------ CPU kernel
    def on_cpu(self, taps: Dict[str, torch.Tensor]) -> bool:
        maps = [taps.get(n) for n in self.zmask.cfg.layers]
        return all(isinstance(m, torch.Tensor) and m.device.type == "cpu" for m in maps)

    def cpu_eligible(self, taps: Dict[str, torch.Tensor], layers: Optional[Sequence[str]] = None) -> Tuple[bool, str]:
        """(True, "") when these CPU taps (of ``layers``, default Z-Mask's) can go through the CPU kernel, else
        (False, why)."""
        zm = self.zmask
        if zm.cfg.spr.mode != "same":
            return False, f"SPR mode {zm.cfg.spr.mode!r} (the CPU kernel implements 'same')"
        maps = [taps[n] for n in (zm.cfg.layers if layers is None else layers)]
        if any(m.dtype != torch.float32 for m in maps):
            return False, f"tap dtypes {sorted({str(m.dtype) for m in maps})} (the CPU kernel reads float32)"
        if torch.is_grad_enabled() and any(m.requires_grad for m in maps):
            return False, "taps require grad (the CPU kernel has no backward)"
        return True, ""

    def cpu_engine(self) -> CpuZMask:
        zm = self.zmask
        if self._cpu is None or self._cpu.stats is not zm.stats or self._cpu.cfg != zm.cfg:
            self._cpu = CpuZMask(zm.cfg, zm.stats)
        return self._cpu

    def _use_cpu(self, taps: Dict[str, torch.Tensor], with_fusion: bool) -> bool:
        if with_fusion:                  # the C tail too (cascades + fusion): inference only, after its own check
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.zmask.fusion.parameters()):
                return False
            if not self._use_cpu(taps, with_fusion=False):
                return False
            if self.cpu_tail_verdict is None:
                self.cpu_tail_verdict = self.mode == "fused" or self._cpu_tail_check(taps)
            return self.cpu_tail_verdict
        ok, why = self.cpu_eligible(taps)
        if self.mode == "fused":
            if ok:
                ok, why = cpu_available()
                why = f"the taps are not on a CUDA device and {why}" if not ok else why
            if not ok:
                raise RuntimeError(f"heatmap_backend='fused' cannot run here: {why}. Run under torch.no_grad() / "
                                   "torch.inference_mode() with float32 taps, or use heatmap_backend='auto'")
            return True
        if not ok:
            return False
        if self.cpu_verdict is None:
            self.cpu_verdict = self._cpu_self_check(taps)
        return self.cpu_verdict

    def _cpu_self_check(self, taps: Dict[str, torch.Tensor]) -> bool:
        """CPU kernel vs reference heatmaps on these taps, within the float32 tolerance."""
        zm = self.zmask
        tol = SELF_CHECK_TOL[torch.float32]
        try:
            with torch.no_grad():
                got = self.terms(taps)
                h_s, h_d, _ = zm.maps_from_terms(got, with_fine=False)
                r_s, r_d = zm.reference_heatmaps(taps)
                errs = {"h_s": rel_err(h_s, r_s), "h_d": rel_err(h_d, r_d)}
        except (CpuKernelUnavailable, MemoryError, ValueError) as exc:
            self._warn(f"the Z-Mask CPU kernel cannot run ({type(exc).__name__}: {exc}); using the reference heatmaps")
            return False
        return self._verdict(errs, tol, "the Z-Mask CPU kernel disagrees")

    def _cpu_tail_check(self, taps: Dict[str, torch.Tensor]) -> bool:
        """The CPU kernel's whole first pass (terms, cascades, fusion) vs the reference: heatmaps, soft mask, score."""
        zm = self.zmask
        with torch.no_grad():
            h_s, h_d, soft, score = self.cpu_engine().detect(taps, zm.fusion)
            r_s, r_d = zm.reference_heatmaps(taps)
            r_soft, r_score = zm.fusion(r_s, r_d)
            errs = {"h_s": rel_err(h_s, r_s), "h_d": rel_err(h_d, r_d), "soft_mask": rel_err(soft, r_soft),
                    "score": rel_err(score, r_score)}
        return self._verdict(errs, SELF_CHECK_TOL[torch.float32], "the Z-Mask CPU kernel's fusion disagrees")

    def terms(self, taps: Dict[str, torch.Tensor]) -> Dict[Tuple[str, Tuple[int, int]], torch.Tensor]:
        """The SPR terms of CPU taps from the CPU kernel (``ZMask.reference_terms``' numbers)."""
        return self.cpu_engine().terms(taps)

    def maybe_terms(self, taps: Dict[str, torch.Tensor]) -> Optional[Dict[Tuple[str, Tuple[int, int]], torch.Tensor]]:
        """The CPU kernel's terms when it runs for these taps, else None (what a growing calibration needs)."""
        return self.terms(taps) if self.on_cpu(taps) and self.use(taps, with_fusion=False) else None

    def mean_abs_z(self, taps: Dict[str, torch.Tensor], stats: ChannelStats,
                   reference: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
                   ) -> Optional[Dict[str, torch.Tensor]]:
        """{layer: (N,1,HR,WR)} channel mean of |z| (z from ``stats``) on the working grid from the CPU kernel, or
        None when these taps do not go through it (``cpu_eligible``: CUDA or non-float32 taps, a 'demo'-mode grid,
        autograd; no kernel; or ``auto``'s
        one-time check against ``reference(taps)`` failed): the caller then computes the reference itself.
        This is how a second statistic on other layers (the outlier cue) shares the kernel."""
        layers = stats.layers()
        if not all(isinstance(taps.get(n), torch.Tensor) and taps[n].device.type == "cpu" and taps[n].dim() == 4
                   for n in layers) or not self.cpu_eligible(taps, layers)[0]:
            return None
        entry = self._mean_abs.get(id(stats))
        if entry is None or entry[0] is not stats:
            if not cpu_available()[0]:
                return None
            entry = (stats, CpuMeanAbsZ(stats, self.zmask.cfg.spr.work_size), None)
        _, kernel, verdict = entry
        got = kernel.mean_abs(taps) if verdict is not False else None
        if verdict is None:
            verdict = True
            if self.mode == "auto":
                with torch.no_grad():
                    ref = reference(taps)
                verdict = self._verdict({n: rel_err(got[n], ref[n]) for n in ref}, SELF_CHECK_TOL[torch.float32],
                                        "the CPU kernel's per-cell |z| disagrees")
        self._mean_abs[id(stats)] = (stats, kernel, verdict)
        return got if verdict else None

    def in_use(self) -> str:
        """What computed the heatmaps so far: 'cpu kernel', 'cuda kernels', 'reference', or a '+'-joined mix."""
        used = []
        if self._cpu is not None and self.cpu_verdict is not False:
            used.append("cpu kernel")
        if self._engine is not None and (self.mode == "fused" or any(self.verdicts.values())):
            used.append("cuda kernels")
        if not used or self.cpu_verdict is False or (self.verdicts and not all(self.verdicts.values())):
            used.append("reference")
        return "+".join(used)

    # ------------------------------------------------------------------ CUDA kernels
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
        return self._verdict(errs, tol, "fused kernels disagree")

    def _verdict(self, errs: Dict[str, float], tol: float, subject: str) -> bool:
        """True when every relative error is within ``tol``; else one warning naming the offenders."""
        bad = {k: v for k, v in errs.items() if not v <= tol}
        if bad:
            self._warn(f"{subject} with the reference (relative errors {bad}, tolerance {tol}); "
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
        if self.on_cpu(taps):
            h_s, h_d, _ = self.zmask.maps_from_terms(self.terms(taps), with_fine=False)
            return h_s, h_d
        h_s, h_d = self.engine().heatmaps(taps)
        dt = self._out_dtype(taps)
        return h_s.to(dt), h_d.to(dt)

    def detect(self, taps: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Detection:
        zm = self.zmask
        if self.on_cpu(taps):
            h_s, h_d, soft, score = self.cpu_engine().detect(taps, zm.fusion)
            flagged = score > zm.cfg.lambda0
            return Detection(h_s, h_d, soft, score, flagged, zm.input_mask(soft, flagged, size))
        det = self.engine().detect(taps, size, zm.fusion, zm.cfg.lambda0, zm.cfg.mask_threshold)
        dt = self._out_dtype(taps)
        return det._replace(h_s=det.h_s.to(dt), h_d=det.h_d.to(dt))


__all__ = ["BACKENDS", "FusedRouter", "RouterFactory", "heatmap_backend", "SELF_CHECK_TOL", "rel_err"]
