"""Run-time compilation and launches of ``zmask_spr.cu`` on torch's current CUDA stream.

CuPy's ``RawModule`` compiles the source with NVRTC (for the device's own architecture, no nvcc
needed); pycuda's ``SourceModule`` (nvcc) is the fallback when CuPy is missing. Kernels read and
write torch tensors in place: arguments are raw device pointers (``data_ptr()``), never copies.
Compiled modules are cached per (backend, device index). Nothing here is imported at package import
time by a CPU-only user: ``available()`` says why the fused path cannot run instead of raising.

Set ``ZMASK_KERNELS_BACKEND=cupy`` or ``=pycuda`` to pick one explicitly.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .launch import SMEM_DEFAULT, DeviceLimits

SOURCE = Path(__file__).with_name("zmask_spr.cu")
KERNEL_NAMES = ("zm_pooled_f32", "zm_pooled_f16", "zm_reduce_layer", "zm_fuse", "zm_mask")
BACKENDS = ("cupy", "pycuda")


class KernelsUnavailable(RuntimeError):
    """The fused kernels cannot run here (no CUDA device, no CuPy/pycuda, or compilation failed)."""


def _try_import(name: str) -> Tuple[Optional[Any], str]:
    """(module, "") or (None, reason); any exception counts (broken CUDA installs raise odd ones)."""
    try:
        if name == "cupy":
            import cupy
            return cupy, ""
        import pycuda.compiler
        import pycuda.driver
        return pycuda.driver, ""
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        return None, f"{name}: {type(exc).__name__}: {exc}"


def backend_name() -> Tuple[Optional[str], str]:
    """The backend that will be used, or (None, why none can be)."""
    forced = os.environ.get("ZMASK_KERNELS_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        return None, f"ZMASK_KERNELS_BACKEND={forced!r} is not one of {BACKENDS}"
    reasons = []
    for name in ((forced,) if forced else BACKENDS):
        mod, why = _try_import(name)
        if mod is not None:
            return name, ""
        reasons.append(why)
    return None, ("no kernel backend importable (" + "; ".join(reasons) + "). Install the GPU extra: "
                  "pip install cupy-cuda13x (or cupy-cuda12x, matching torch's CUDA)")


def available() -> Tuple[bool, str]:
    """(True, what will run) when the fused kernels can be launched, else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    name, why = backend_name()
    if name is None:
        return False, why
    return True, f"{name} on {torch.cuda.get_device_name()}"


def ptr(t: Optional[torch.Tensor], offset_bytes: int = 0) -> np.uint64:
    """A device pointer kernel argument (0 for None)."""
    return np.uint64(0 if t is None else t.data_ptr() + offset_bytes)


class _CupyModule:
    def __init__(self, index: int) -> None:
        import cupy
        self._cupy, self.index = cupy, index
        with cupy.cuda.Device(index):
            mod = cupy.RawModule(code=SOURCE.read_text())
            self.fns = {n: mod.get_function(n) for n in KERNEL_NAMES}
            for fn in self.fns.values():
                fn.compile()                       # compile now: errors surface at load, not mid-pipeline
        self._optin: Dict[str, int] = {}
        self._streams: Dict[int, Any] = {}

    def launch(self, name: str, grid: Tuple[int, ...], block: Tuple[int, ...], args: Sequence[Any], shared: int,
               stream: int) -> None:
        cupy = self._cupy
        fn = self.fns[name]
        if shared > SMEM_DEFAULT and self._optin.get(name, 0) < shared:
            fn.max_dynamic_shared_size_bytes = shared
            self._optin[name] = shared
        ext = self._streams.get(stream)
        if ext is None:
            ext = self._streams[stream] = cupy.cuda.ExternalStream(stream, self.index)
        with cupy.cuda.Device(self.index), ext:
            fn(grid, block, tuple(args), shared_mem=shared)


class _PycudaModule:
    """pycuda fallback. pycuda cannot adopt torch's stream: on a non-default stream it synchronises
    torch's stream before and the context after each launch (correct, slower)."""

    def __init__(self, index: int) -> None:
        import pycuda.driver as drv
        from pycuda.compiler import SourceModule
        drv.init()
        self._drv, self.ctx = drv, drv.Device(index).retain_primary_context()   # torch's context
        self.ctx.push()
        try:
            mod = SourceModule(SOURCE.read_text(), no_extern_c=True)
            self.fns = {n: mod.get_function(n) for n in KERNEL_NAMES}
        finally:
            self.ctx.pop()

    def launch(self, name: str, grid: Tuple[int, ...], block: Tuple[int, ...], args: Sequence[Any], shared: int,
               stream: int) -> None:
        drv, fn = self._drv, self.fns[name]
        self.ctx.push()
        try:
            if shared > SMEM_DEFAULT:
                fn.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
            if stream:
                torch.cuda.current_stream().synchronize()
            fn(*args, grid=tuple(grid), block=tuple(block), shared=shared)
            if stream:
                drv.Context.synchronize()
        finally:
            self.ctx.pop()


_MODULES: Dict[Tuple[str, int], Any] = {}
_LIMITS: Dict[int, DeviceLimits] = {}
_LOCK = threading.Lock()


def module(device: torch.device) -> Any:
    """The compiled module for ``device`` (compiled on first use, then cached)."""
    ok, why = available()
    if not ok:
        raise KernelsUnavailable(f"fused Z-Mask kernels unavailable: {why}")
    name, _ = backend_name()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (str(name), index)
    with _LOCK:
        if key not in _MODULES:
            try:
                _MODULES[key] = _CupyModule(index) if name == "cupy" else _PycudaModule(index)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise KernelsUnavailable(f"compiling {SOURCE.name} with {name} failed on cuda:{index}: "
                                         f"{type(exc).__name__}: {exc}") from exc
        return _MODULES[key]


def device_limits(device: torch.device) -> DeviceLimits:
    """SM count, compute capability and the shared-memory opt-in limit of ``device`` (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _LIMITS:
        props = torch.cuda.get_device_properties(index)
        optin = getattr(props, "shared_memory_per_block_optin", None)
        if optin is None and backend_name()[0] == "cupy":
            import cupy
            optin = cupy.cuda.runtime.getDeviceProperties(index).get("sharedMemPerBlockOptin")
        _LIMITS[index] = DeviceLimits.for_arch((props.major, props.minor), props.multi_processor_count, optin)
    return _LIMITS[index]


def launch(device: torch.device, name: str, grid: Tuple[int, ...], block: Tuple[int, ...], args: Sequence[Any],
           shared: int = 0) -> None:
    """Launch kernel ``name`` on torch's current stream of ``device``."""
    stream = torch.cuda.current_stream(device).cuda_stream
    module(device).launch(name, tuple(int(g) for g in grid), tuple(int(b) for b in block), args, int(shared), stream)


__all__ = ["KERNEL_NAMES", "KernelsUnavailable", "SOURCE", "available", "backend_name", "device_limits", "launch",
           "module", "ptr"]
