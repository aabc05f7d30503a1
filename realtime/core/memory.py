"""Process heap policy for the frame loop: keep freed memory instead of handing it back to the OS every frame.

glibc's malloc returns large freed blocks to the kernel (``munmap``, heap trimming) with thresholds it adapts
as the program runs. A CPU forward pass frees and re-allocates the same few MB of activations every frame;
whether that memory is reused or unmapped and faulted in again is then a matter of the adaptive thresholds'
history. Measured on the 2-core EPYC VM (DDRNet-23-slim, 360x480, minor page faults from ``getrusage``): one
bare forward ran with 0 or ~3,500 faults per frame depending on the process start, a forward that keeps
Z-Mask's three tapped maps until the heatmaps are done with 130 to ~3,800, and in a probe timing both side by
side the tapped forward was 2.3-2.8 ms slower than the bare one (the committed CPU latency run's "backbone
with taps +0.7 ms"). With fixed thresholds (mmap 64 MiB, trim 1 GiB) both fell to ~0 faults per frame
and the tapped forward timed the same as the bare one (medians equal to 0.01 ms, two runs). The code uses a
32 MiB mmap threshold, the most glibc < 2.35 accepts; a fresh-process frame loop with it is tested
(tests/test_memory.py).

``steady_heap()`` sets those two thresholds once (``mallopt``). It is a process-wide setting, so only the
entry points call it (``realtime.run`` and the latency benchmark, through their configs). Elsewhere than
glibc it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1          # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20      # blocks below this come from the heap (and are reused); glibc < 2.35 refuses > 32 MiB
TRIM_THRESHOLD = 1 << 30       # free memory at the heap's top is returned to the OS only beyond this


def steady_heap(enabled: bool = True) -> str:
    """Fix glibc's mmap and trim thresholds (see the module docstring); returns what was done, for results files."""
    if not enabled:
        return "default malloc (not changed)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"default malloc ({platform.system()} {platform.libc_ver()[0] or 'non-glibc'}: not changed)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:
        return f"default malloc (mallopt unavailable: {exc})"
    if not (mmap_ok and trim_ok):
        return (f"default malloc (mallopt refused the {'mmap' if not mmap_ok else 'trim'} threshold"
                f"{'' if mmap_ok or trim_ok else ' and the trim threshold'})")
    return f"steady heap (glibc mallopt: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 30} GiB)"


__all__ = ["steady_heap"]
