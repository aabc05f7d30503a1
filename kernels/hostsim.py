"""Build and drive ``hostsim.cpp``: the real ``zmask_spr.cu`` run on the CPU, one fiber per CUDA thread.

``launch`` has the signature of ``runtime.launch``, so tests can route ``FusedZMask`` through it and
check the CUDA source AND the Python launch code (argument order and types, plans, buffers) on a
machine without a GPU. It needs g++ (C++17); ``build()`` raises ``HostSimUnavailable`` otherwise.
Slow: for small grids only.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from .runtime import SOURCE

HARNESS = Path(__file__).with_name("hostsim.cpp")
# The only textual differences between the simulated and the real source (each must be found once).
EDITS = (
    ("extern __shared__ double zm_smem[];", "extern double zm_smem[];"),
    ("__shared__", "static"),
    ('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));', "f = zm_sim_h2f(b);"),
)
CODES = {np.uint64: "p", np.int64: "q", np.int32: "i", np.float32: "f"}
CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.float32: ctypes.c_float}
ERRORS = {-1: "unknown kernel", -2: "too much shared memory or bad block size", -3: "deadlock at a barrier/shuffle",
          -4: "argument types do not match the kernel's signature"}


class HostSimUnavailable(RuntimeError):
    """No C++17 compiler to build the simulator."""


def simulated_source() -> str:
    src = SOURCE.read_text()
    for old, new in EDITS:
        if old not in src:
            raise RuntimeError(f"host simulator: expected {old!r} in {SOURCE.name}; update kernels/hostsim.py")
        src = src.replace(old, new)
    return src


_LIB: Optional[ctypes.CDLL] = None


def build() -> ctypes.CDLL:
    """Compile (once per source version, cached in the temp dir) and load the simulator."""
    global _LIB
    if _LIB is not None:
        return _LIB
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise HostSimUnavailable("no C++ compiler (g++) on PATH")
    src = simulated_source()
    tag = hashlib.sha256((src + HARNESS.read_text()).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"zmask_hostsim_{tag}"
    lib = out / "hostsim.so"
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "zmask_spr_sim.cu").write_text(src)
        tmp = out / f"hostsim.{id(out)}.so"
        cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-Wno-unknown-pragmas",
               f'-DZM_SIM_SOURCE="{out / "zmask_spr_sim.cu"}"', str(HARNESS), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"building the host simulator failed:\n{res.stderr[-4000:]}")
        tmp.replace(lib)
    _LIB = ctypes.CDLL(str(lib))
    _LIB.zm_sim_launch.restype = ctypes.c_int
    _LIB.zm_sim_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    return _LIB


def launch(device: torch.device, name: str, grid: Tuple[int, ...], block: Tuple[int, ...], args: Sequence[Any],
           shared: int = 0) -> None:
    """``runtime.launch`` on the simulator; pointers must be host (CPU tensor) addresses."""
    if len(grid) != 3 or grid[2] != 1 or len(block) != 3 or block[1:] != (1, 1):
        raise ValueError(f"the simulator runs 2-D grids of 1-D blocks, got grid {grid}, block {block}")
    vals = []
    for a in args:
        kind = type(a)
        if kind not in CTYPES:
            raise TypeError(f"{name}: kernel argument {a!r} of type {kind.__name__}; pass numpy scalars")
        vals.append(CTYPES[kind](a.item()))
    ptrs = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.addressof(v) for v in vals])
    codes = "".join(CODES[type(a)] for a in args).encode()
    rc = build().zm_sim_launch(name.encode(), grid[0], grid[1], block[0], shared, ptrs, codes)
    if rc != 0:
        raise RuntimeError(f"host simulator: {name}: {ERRORS.get(rc, rc)}")


__all__ = ["HostSimUnavailable", "build", "launch", "simulated_source"]
