"""Z-Mask's SPR terms on the CPU from one C pass per channel (``zmask_cpu.c``), loaded with ctypes.

The plain-torch heatmaps spend ~25 ms per 360x480 frame on the 2-core CPU in ~130 small tensor ops
(resize, z-score, prefix sums, slices, |.|, means: each a pass over a 64-128-channel map), against a
~2 MB read of the taps. The C kernel keeps one channel at a time in cache: resize + z-score into a
summed-area table, then four table reads per pixel and kernel, |.| summed over channels; threads
split the channels. The per-term means come back as tensors (``terms``: a growing calibration and the
self-check use them with the reference's own cascade code); ``CpuZMask.detect`` also runs the cascades and
the 8-scalar fusion block in a second C function (``zm_cpu_tail``) instead of ~60 tiny tensor ops.

The library is compiled on first use with the system C compiler (``$CC``, else cc / gcc / clang;
``-O3 -fno-trapping-math -march=native -fopenmp``, retried without ``-march``, then without OpenMP, when that fails) into a
per-user cache keyed by the source, flags, compiler and CPU, so a fresh machine pays one ~1 s compile.
``cpu_available()`` says why it cannot run (no compiler, compile error) instead of raising; callers then
stay on the reference.
'same' SPR mode only ('demo' stays on the reference). Inference only: no autograd.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from realtime.defenses import PARAM_NAMES, ChannelStats, ZMaskConfig

from .emulate import linear_index, windows

SOURCE = Path(__file__).with_name("zmask_cpu.c")
EPS = 1e-5                     # spr.zscore's eps
# OpenMP first (the team is torch's own intra-op pool, see zmask_cpu.c), then plain POSIX threads.
# -fno-trapping-math lets the C tail's clamps be if-converted and vectorised (no result changes: no reassociation).
FLAG_SETS = tuple(("-O3", "-fno-trapping-math", *f) for f in (("-march=native", "-fopenmp"), ("-fopenmp",),
                                                              ("-march=native",), ()))
Term = Tuple[str, Tuple[int, int]]

_LOCK = threading.Lock()
_LIB: Dict[str, object] = {}   # "lib" -> CDLL, or "error" -> why it cannot be had


class CpuKernelUnavailable(RuntimeError):
    """No C compiler, or the CPU kernel did not compile or load."""


_P, _I = ctypes.c_void_p, ctypes.c_int


class _Desc(ctypes.Structure):
    """``zm_layer`` in zmask_cpu.c: one hooked layer's tap, constants and output (raw pointers)."""
    _fields_ = [("tap", _P), ("n", _I), ("c", _I), ("h", _I), ("w", _I), ("a", _P), ("b", _P),
                ("y0", _P), ("y1", _P), ("ly", _P), ("x0", _P), ("x1", _P), ("lx", _P),
                ("nk", _I), ("rh", _P), ("rw", _P), ("inv", _P), ("out", _P)]


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("ZMASK_CPU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "realtime-zmask")
    return Path(root)


def _cpu_id() -> str:
    """The CPU's model and feature flags (a -march=native build is only valid on the same kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, flags: Tuple[str, ...]) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_id().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"zmask_cpu_{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cc, *flags, "-std=c99", "-fPIC", "-shared", "-pthread", str(SOURCE), "-o", str(tmp_out), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise CpuKernelUnavailable(f"{' '.join(cmd)} failed: {' '.join(res.stderr.split())[:300]}")
        os.replace(tmp_out, out)          # atomic: concurrent builders never load a half-written file
    return out


def load() -> ctypes.CDLL:
    """The compiled library (built on first use, cached); raises ``CpuKernelUnavailable``."""
    with _LOCK:
        if "lib" in _LIB:
            return _LIB["lib"]            # type: ignore[return-value]
        if "error" in _LIB:
            raise CpuKernelUnavailable(str(_LIB["error"]))
        cc = _compiler()
        errors: List[str] = []
        lib = None
        if cc is None:
            errors.append("no C compiler found ($CC, cc, gcc, clang)")
        else:
            for flags in FLAG_SETS:
                try:
                    lib = ctypes.CDLL(str(_build(cc, flags)))
                    break
                except (CpuKernelUnavailable, OSError, subprocess.SubprocessError) as exc:
                    errors.append(str(exc))
        if lib is None:
            _LIB["error"] = "the Z-Mask CPU kernel is unavailable: " + "; ".join(errors)
            raise CpuKernelUnavailable(str(_LIB["error"]))
        fn = lib.zm_cpu_terms
        fn.argtypes = [ctypes.POINTER(_Desc), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        tail = lib.zm_cpu_tail
        tail.argtypes = [_P, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _P]
        tail.restype = None
        _LIB["lib"] = lib
        return lib


def cpu_available() -> Tuple[bool, str]:
    """(True, "") when the CPU kernel compiles and loads here, else (False, why)."""
    try:
        load()
        return True, ""
    except CpuKernelUnavailable as exc:
        return False, str(exc)


def linear_indices(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 per output index of torch's bilinear resize along one axis
    (``emulate.linear_index``, the fused kernels' mirror), as the C kernel reads them."""
    i0, i1, _, l1 = linear_index(np.arange(n_out), n_in, n_out)
    return i0.astype(np.int32), i1.astype(np.int32), np.ascontiguousarray(l1, dtype=np.float32)


def _window_counts(n: int, k: int) -> np.ndarray:
    """Pixels in each clipped 'same'-mode window of size ``k`` along an axis of ``n``."""
    first, last = windows(n, k, "same")
    return (last - first + 1).astype(np.float64)


class _Layer:
    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, kernels: List[Tuple[int, int]],
                 work: Tuple[int, int]) -> None:
        s = sigma.detach().double().cpu().numpy()
        m = mu.detach().double().cpu().numpy()
        self.a = np.ascontiguousarray(1.0 / (s + EPS), dtype=np.float32)
        self.b = np.ascontiguousarray(-m / (s + EPS), dtype=np.float32)
        self.kernels = kernels
        self.rh = np.array([k[0] // 2 for k in kernels], dtype=np.int32)
        self.rw = np.array([k[1] // 2 for k in kernels], dtype=np.int32)
        c = len(self.a)
        hr, wr = work
        self.inv = np.ascontiguousarray(np.stack([
            1.0 / (c * _window_counts(hr, kh)[:, None] * _window_counts(wr, kw)[None, :]) for kh, kw in kernels]),
            dtype=np.float32)
        self.interp: Dict[Tuple[int, int], Tuple[np.ndarray, ...]] = {}

    def indices(self, h: int, w: int, work: Tuple[int, int]) -> Tuple[np.ndarray, ...]:
        if (h, w) not in self.interp:
            self.interp[(h, w)] = (*linear_indices(h, work[0]), *linear_indices(w, work[1]))
        return self.interp[(h, w)]


class CpuTerms:
    """Window-mean terms ``channel mean of |BoxMean_k(z)|`` on a working grid for CPU float32 taps, one C call.

    ``layers``: {name: (mu, sigma, kernels)}, each layer z-scored with its own statistics and pooled with its
    own 'same'-mode kernels; a (1, 1) kernel gives the plain channel mean of |z| per cell. ``threads``
    (default: ``$ZMASK_CPU_THREADS``, else torch's intra-op thread count at call time) splits the channels."""

    def __init__(self, layers: Dict[str, Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]],
                 work: Tuple[int, int], threads: Optional[int] = None) -> None:
        self.work = (int(work[0]), int(work[1]))
        self.threads = threads
        self.layers: Dict[str, _Layer] = {
            name: _Layer(mu, sigma, list(dict.fromkeys(tuple(int(v) for v in k) for k in kernels)), self.work)
            for name, (mu, sigma, kernels) in layers.items()}
        self.fn = load().zm_cpu_terms

    def terms(self, taps: Dict[str, torch.Tensor]) -> Dict[Term, torch.Tensor]:
        """{(layer, kernel): (N,1,HR,WR) float32} for the layers of ``taps`` (CPU tensors), one C call."""
        hr, wr = self.work
        threads = int(self.threads or os.environ.get("ZMASK_CPU_THREADS") or torch.get_num_threads())
        descs = (_Desc * len(self.layers))()
        keep: List[torch.Tensor] = []             # the tensors the raw pointers point into, alive until the call ends
        results: List[Tuple[_Layer, torch.Tensor]] = []
        for d, (name, lay) in zip(descs, self.layers.items()):
            t = taps[name]
            if t.dim() != 4 or t.device.type != "cpu":
                raise ValueError(f"layer {name!r}: the CPU kernel takes a (N,C,H,W) CPU map, got "
                                 f"{tuple(t.shape)} on {t.device}")
            if t.shape[1] != len(lay.a):
                raise ValueError(f"layer {name!r}: tap has {t.shape[1]} channels but statistics have {len(lay.a)}")
            t = t.detach().to(torch.float32).contiguous()
            n, c, h, w = (int(v) for v in t.shape)
            y0, y1, ly, x0, x1, lx = lay.indices(h, w, self.work)
            res = torch.empty(n, len(lay.kernels), hr, wr, dtype=torch.float32)
            keep += [t, res]
            results.append((lay, res))
            d.tap, d.n, d.c, d.h, d.w = t.data_ptr(), n, c, h, w
            d.a, d.b, d.inv, d.out = lay.a.ctypes.data, lay.b.ctypes.data, lay.inv.ctypes.data, res.data_ptr()
            d.y0, d.y1, d.ly, d.x0, d.x1, d.lx = (v.ctypes.data for v in (y0, y1, ly, x0, x1, lx))
            d.nk, d.rh, d.rw = len(lay.kernels), lay.rh.ctypes.data, lay.rw.ctypes.data
        if self.fn(descs, len(self.layers), hr, wr, threads) != 0:
            raise MemoryError("the Z-Mask CPU kernel could not allocate its scratch")
        out: Dict[Term, torch.Tensor] = {}
        for (name, _), (lay, res) in zip(self.layers.items(), results):
            for i, k in enumerate(lay.kernels):
                out[(name, k)] = res[:, i:i + 1]
        return out


class CpuZMask(CpuTerms):
    """The per-(layer, kernel) SPR terms of ``ZMask.reference_terms`` for CPU float32 taps, from the C kernel."""

    def __init__(self, cfg: ZMaskConfig, stats: ChannelStats, threads: Optional[int] = None) -> None:
        if cfg.spr.mode != "same":
            raise CpuKernelUnavailable(f"the CPU kernel implements SPR mode 'same' only, not {cfg.spr.mode!r}")
        self.cfg, self.stats = cfg, stats
        spr = cfg.spr
        layers = {name: (stats.mu[name], stats.sigma[name],
                         list((spr.kernels_shallow if name in cfg.shallow else ())
                              + (spr.kernels_deep if name in cfg.deep else ())))
                  for name in cfg.layers}
        super().__init__(layers, spr.work_size, threads)
        # The cascades as (role, [(layer, kernel), ...]) in the reference's order (maps_from_terms).
        self.cascades = ([(0, [(n, tuple(k)) for k in spr.kernels_shallow]) for n in cfg.shallow]
                         + [(1, [(n, tuple(k)) for k in spr.kernels_deep]) for n in cfg.deep])
        if not cfg.shallow or not cfg.deep:
            raise CpuKernelUnavailable("the CPU kernel's fusion needs shallow and deep layers")
        self.tail = load().zm_cpu_tail
        self._steps = [key for _, keys in self.cascades for key in keys]
        self._lens = (ctypes.c_int * len(self.cascades))(*(len(keys) for _, keys in self.cascades))
        self._roles = (ctypes.c_int * len(self.cascades))(*(role for role, _ in self.cascades))

    def detect(self, taps: Dict[str, torch.Tensor], fusion: torch.nn.Module
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_S, H_D, soft mask M~, score d) from one terms call and one C tail: the cascades, their maxima and the
        fusion block, which in torch are ~60 tensor ops on a 53x70 grid (about 0.4 ms of Python per frame)."""
        terms = self.terms(taps)
        hr, wr = self.work
        steps = [terms[key] for key in self._steps]
        n, plane = int(steps[0].shape[0]), hr * wr
        if any(int(t.shape[0]) != n for t in steps):
            raise ValueError(f"taps of different batch sizes {sorted({int(t.shape[0]) for t in steps})}")
        ptr = (ctypes.c_void_p * len(steps))(*(t.data_ptr() for t in steps))
        stride = (ctypes.c_long * len(steps))(*(t.stride(0) for t in steps))
        w = torch.stack([getattr(fusion, name).detach() for name in PARAM_NAMES]).to(torch.float32)
        out = torch.empty(3 * n * plane + n + plane, dtype=torch.float32)      # h_s, h_d, soft, score, scratch
        maps = out[:3 * n * plane].view(3, n, 1, hr, wr)
        base = out.data_ptr()
        self.tail(ptr, stride, self._lens, self._roles, len(self.cascades), n, plane, w.data_ptr(), base,
                  base + 4 * n * plane, base + 8 * n * plane, base + 12 * n * plane, base + 4 * (3 * n * plane + n))
        return maps[0], maps[1], maps[2], out[3 * n * plane:3 * n * plane + n]


class CpuMeanAbsZ(CpuTerms):
    """Per layer the channel mean of |z| on the working grid (N,1,HR,WR): the (1, 1)-kernel term, e.g. the
    outlier cue's map before its pooling (``realtime.defenses.cue``)."""

    def __init__(self, stats: ChannelStats, work: Tuple[int, int], threads: Optional[int] = None) -> None:
        super().__init__({n: (stats.mu[n], stats.sigma[n], [(1, 1)]) for n in stats.layers()}, work, threads)

    def mean_abs(self, taps: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: t for (name, _), t in self.terms(taps).items()}


__all__ = ["CpuKernelUnavailable", "CpuMeanAbsZ", "CpuTerms", "CpuZMask", "cpu_available", "linear_indices", "load"]
