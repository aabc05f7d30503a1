"""Launch geometry, table packing and input checks for the fused Z-Mask kernels (pure Python, no GPU).

Everything the CUDA side needs to be told is decided here, so it can be unit-tested on a CPU:

* ``pack_layers``: each hooked layer's distinct box kernels (shallow list, then deep extras) and, per
  cascade, the indices of its kernels in that list, flattened to the int32 table ``zm_fuse`` reads;
* ``plan_pooled``: block size, channel chunking, pixel slabs and where the summed-area tables (SATs)
  live: dynamic shared memory when one double SAT fits the architecture's per-block limit, else a
  per-block slot of global scratch (a persistent grid bounds its size);
* ``check_tap`` / ``check_stats``: shapes, dtypes, devices and finiteness, with errors naming the layer.

The constants mirror the ``#define``s of ``zmask_spr.cu`` (a test compares them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Kernel = Tuple[int, int]

PPT = 8                    # ZM_PPT: pixels per thread per slab
KG = 4                     # ZM_KG: box kernels per work item
LMAX = 8                   # ZM_LMAX: longest cascade
REC = 4 + 2 * LMAX         # ZM_REC: ints per layer record
THREADS_MAX = 512          # ZM_THREADS_MAX (__launch_bounds__)
POINTWISE_THREADS = 256    # reduce / fuse / mask kernels
SMEM_DEFAULT = 48 * 1024   # dynamic shared memory usable without opting in
SCRATCH_CAP = 256 << 20    # global SAT scratch bound (bytes) for the persistent grid
MODE_CODES = {"same": 0, "demo": 1}
DTYPES = {torch.float32: "f32", torch.float16: "f16"}

# Per-block shared-memory opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability,
# used when the device cannot be asked. CUDA 13 no longer targets 7.0/7.2 (kept for older toolkits).
SMEM_OPTIN: Dict[Tuple[int, int], int] = {
    (7, 0): 98304, (7, 2): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
    (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (10, 3): 232448, (11, 0): 232448, (12, 0): 101376,
    (12, 1): 101376,
}


@dataclass(frozen=True)
class DeviceLimits:
    """What the planner needs to know about a GPU: compute capability, SM count, shared memory per block."""
    cc: Tuple[int, int]
    sm_count: int
    smem_optin: int
    blocks_per_sm: int = 2

    def __post_init__(self) -> None:
        if self.sm_count < 1 or self.blocks_per_sm < 1:
            raise ValueError(f"sm_count and blocks_per_sm must be >= 1, got {self.sm_count}, {self.blocks_per_sm}")
        if self.smem_optin < 0:
            raise ValueError(f"smem_optin must be >= 0, got {self.smem_optin}")

    @classmethod
    def for_arch(cls, cc: Tuple[int, int], sm_count: int, smem_optin: Optional[int] = None) -> "DeviceLimits":
        """Limits for compute capability ``cc``; unknown architectures get the 48 KiB every GPU allows."""
        optin = smem_optin if smem_optin is not None else SMEM_OPTIN.get(tuple(cc), SMEM_DEFAULT)
        return cls(cc=(int(cc[0]), int(cc[1])), sm_count=int(sm_count), smem_optin=int(optin))

    @property
    def target_blocks(self) -> int:
        return self.sm_count * self.blocks_per_sm


@dataclass(frozen=True)
class LayerSpec:
    """One hooked layer: its distinct kernels, and per cascade the kernel indices in cascade order."""
    name: str
    kernels: Tuple[Kernel, ...]
    shallow: Tuple[int, ...]
    deep: Tuple[int, ...]


@dataclass(frozen=True)
class LayerTable:
    """All layers of a Z-Mask configuration, with each layer's offset in the stacked pooled maps."""
    layers: Tuple[LayerSpec, ...]
    koff: Tuple[int, ...]
    ktot: int

    def ints(self) -> List[int]:
        """``[records (L * REC) | kernel pairs (ktot * 2)]``: the int32 table the kernels read."""
        out: List[int] = []
        for spec, off in zip(self.layers, self.koff):
            rec = [off, len(spec.kernels), len(spec.shallow), len(spec.deep)]
            rec += list(spec.shallow) + [0] * (LMAX - len(spec.shallow))
            rec += list(spec.deep) + [0] * (LMAX - len(spec.deep))
            out += rec
        for spec in self.layers:
            for kh, kw in spec.kernels:
                out += [kh, kw]
        return out

    def kernel_offset(self, layer: int) -> int:
        """Index (in ints) of layer ``layer``'s first kernel pair in ``ints()``."""
        return len(self.layers) * REC + 2 * self.koff[layer]


def pack_layers(shallow: Sequence[str], deep: Sequence[str], kernels_shallow: Sequence[Kernel],
                kernels_deep: Sequence[Kernel]) -> LayerTable:
    """The layer table for a configuration; layers in first-seen order (shallow, then deep)."""
    ks = tuple((int(a), int(b)) for a, b in kernels_shallow)
    kd = tuple((int(a), int(b)) for a, b in kernels_deep)
    if not ks or not kd:
        raise ValueError("both kernel lists need at least one kernel")
    for k in ks + kd:
        if k[0] < 1 or k[1] < 1:
            raise ValueError(f"kernels must be (kh, kw) with both >= 1, got {k}")
    if len(ks) > LMAX or len(kd) > LMAX:
        raise ValueError(f"the fused kernel supports cascades of at most {LMAX} kernels, got "
                         f"{len(ks)} shallow / {len(kd)} deep")
    specs: List[LayerSpec] = []
    koff: List[int] = []
    total = 0
    for name in dict.fromkeys((*shallow, *deep)):
        in_s, in_d = name in shallow, name in deep
        distinct = tuple(dict.fromkeys((ks if in_s else ()) + (kd if in_d else ())))
        specs.append(LayerSpec(name, distinct, tuple(distinct.index(k) for k in ks) if in_s else (),
                               tuple(distinct.index(k) for k in kd) if in_d else ()))
        koff.append(total)
        total += len(distinct)
    if not specs:
        raise ValueError("Z-Mask needs at least one layer")
    return LayerTable(tuple(specs), tuple(koff), total)


def sat_pitch(wr: int) -> int:
    """Row pitch (in doubles) of a SAT: WR+1 rounded up to odd, so a warp walking a column hits
    distinct shared-memory banks."""
    return wr + 1 if (wr + 1) % 2 == 1 else wr + 2


@dataclass(frozen=True)
class PooledPlan:
    """Launch of ``zm_pooled_*`` for one layer; see ``plan_pooled``."""
    threads: int
    chunk: int          # channels per work item
    n_chunks: int
    sats: int           # SATs held at once per block
    n_slabs: int        # pixel slabs of threads * PPT pixels
    pitch: int
    grid: int           # persistent blocks (<= items)
    items: int          # N * n_chunks * kernel groups
    shared_bytes: int   # dynamic shared memory; 0 when the SATs live in global scratch
    scratch_doubles: int
    partial_floats: int

    def __post_init__(self) -> None:
        if self.threads % 32 or not 32 <= self.threads <= THREADS_MAX:
            raise ValueError(f"threads must be a multiple of 32 in [32, {THREADS_MAX}], got {self.threads}")
        if min(self.chunk, self.n_chunks, self.sats, self.n_slabs, self.grid, self.items) < 1:
            raise ValueError(f"invalid plan {self}")
        if self.sats > self.chunk:
            raise ValueError(f"sats ({self.sats}) cannot exceed the channel chunk ({self.chunk})")
        if self.n_slabs > 1 and self.chunk != self.sats:
            raise ValueError("with several pixel slabs a block must hold all SATs of its chunk (chunk == sats)")
        if (self.shared_bytes == 0) == (self.scratch_doubles == 0):
            raise ValueError("exactly one of shared_bytes / scratch_doubles must be set")
        if self.grid > self.items:
            raise ValueError(f"grid ({self.grid}) larger than the number of work items ({self.items})")

    @property
    def use_shared(self) -> bool:
        return self.shared_bytes > 0


def plan_pooled(n: int, c: int, work_size: Tuple[int, int], k: int, limits: DeviceLimits,
                threads: Optional[int] = None, chunk: Optional[int] = None,
                force_global: bool = False) -> PooledPlan:
    """Plan one layer's pooled-map launch: ``n`` samples, ``c`` channels, ``k`` distinct kernels.

    Threads: just enough for one slab (every pixel's accumulators in registers), at most 512.
    Chunking: channels per work item so that items ~ the device's target block count (more chunks =
    more parallelism, but more partial sums to store and reduce). One double SAT in shared memory
    when it fits the per-block opt-in limit (several when they fit the default 48 KiB), else
    per-block global scratch. ``threads``/``chunk``/``force_global`` override, e.g. to test paths.
    """
    hr, wr = int(work_size[0]), int(work_size[1])
    if min(n, c, k, hr, wr) < 1:
        raise ValueError(f"n, c, k and the working size must be >= 1, got {n}, {c}, {k}, {hr}x{wr}")
    hw = hr * wr
    if (hr + 1) * sat_pitch(wr) >= 2 ** 31:
        raise ValueError(f"working grid {hr}x{wr} too large for 32-bit pixel indices")
    if threads is None:
        threads = min(THREADS_MAX, max(128, 32 * math.ceil(hw / PPT / 32)))
    n_slabs = math.ceil(hw / (threads * PPT))
    kgroups = math.ceil(k / KG)
    pitch = sat_pitch(wr)
    sat_doubles = (hr + 1) * pitch
    sat_bytes = 8 * sat_doubles
    use_shared = not force_global and sat_bytes <= limits.smem_optin
    if chunk is None:
        chunk = max(1, (n * c * kgroups) // limits.target_blocks)
    chunk = max(1, min(int(chunk), c))
    if use_shared:
        budget = min(SMEM_DEFAULT, limits.smem_optin)
        fit = max(1, budget // sat_bytes) if sat_bytes <= budget else 1
        sats = min(fit, chunk)
        if n_slabs > 1:
            chunk = sats
    else:
        room = max(1, SCRATCH_CAP // (min(limits.target_blocks, n * math.ceil(c / chunk) * kgroups) * sat_bytes))
        sats = chunk = min(chunk, room)
    n_chunks = math.ceil(c / chunk)
    items = n * n_chunks * kgroups
    grid = min(items, limits.target_blocks)
    if not use_shared:
        grid = min(grid, max(1, SCRATCH_CAP // (sats * sat_bytes)))
    return PooledPlan(threads=threads, chunk=chunk, n_chunks=n_chunks, sats=sats, n_slabs=n_slabs, pitch=pitch,
                      grid=grid, items=items, shared_bytes=sats * sat_bytes if use_shared else 0,
                      scratch_doubles=0 if use_shared else grid * sats * sat_doubles,
                      partial_floats=n * n_chunks * k * hw)


def pointwise_grid(pixels: int, n: int, threads: int = POINTWISE_THREADS) -> Tuple[Tuple[int, int, int],
                                                                                   Tuple[int, int, int]]:
    """(grid, block) for the per-pixel kernels: x over pixels, y over samples."""
    if pixels < 1 or n < 1:
        raise ValueError(f"pixels and n must be >= 1, got {pixels}, {n}")
    if n > 65535:
        raise ValueError(f"batch of {n} exceeds the CUDA grid's y limit (65535)")
    if pixels >= 2 ** 31:
        raise ValueError(f"{pixels} pixels exceed 32-bit indexing")
    return (math.ceil(pixels / threads), n, 1), (threads, 1, 1)


def check_tap(name: str, t: object, channels: int, device: Optional[torch.device] = None,
              check_finite: bool = False) -> torch.Tensor:
    """Raise a clear error unless ``t`` is a (N,C,h,w) fp32/fp16 CUDA-or-CPU tensor with ``channels`` channels."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layer {name!r}: expected a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"layer {name!r}: expected a (N,C,H,W) map, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"layer {name!r}: the fused kernel reads float32 or float16 maps, got {t.dtype} "
                        "(cast with .float())")
    if t.shape[1] != channels:
        raise ValueError(f"layer {name!r}: tap has {t.shape[1]} channels but statistics have {channels}")
    if min(t.shape) < 1:
        raise ValueError(f"layer {name!r}: empty map of shape {tuple(t.shape)}")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"layer {name!r}: negative strides {t.stride()} are not supported")
    if device is not None and t.device != device:
        raise ValueError(f"layer {name!r}: tap is on {t.device}, other taps on {device}")
    if check_finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"layer {name!r}: tap contains NaN or inf values")
    return t


def check_stats(name: str, mu: torch.Tensor, sigma: torch.Tensor) -> int:
    """Raise unless mu/sigma are finite 1-D-able tensors of one length with sigma >= 0; returns C."""
    if mu.numel() != sigma.numel() or mu.numel() < 1:
        raise ValueError(f"layer {name!r}: mu has {mu.numel()} channels, sigma {sigma.numel()}")
    if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())):
        raise ValueError(f"layer {name!r}: channel statistics contain NaN or inf")
    if bool((sigma < 0).any()):
        raise ValueError(f"layer {name!r}: negative sigma in the channel statistics")
    return int(mu.numel())


def check_batch(taps: Dict[str, torch.Tensor], layers: Sequence[str]) -> int:
    """All taps share one batch size (returned); raises KeyError naming missing layers."""
    missing = [n for n in layers if n not in taps]
    if missing:
        raise KeyError(f"taps missing for layers {missing}; have {sorted(taps)}")
    sizes = {n: int(taps[n].shape[0]) for n in layers}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"taps disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


__all__ = ["DeviceLimits", "LayerSpec", "LayerTable", "PooledPlan", "check_batch", "check_stats", "check_tap",
           "pack_layers", "plan_pooled", "pointwise_grid", "sat_pitch"]
