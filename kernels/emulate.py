"""CPU emulation of the fused Z-Mask kernels: the same arithmetic as ``zmask_spr.cu``, in numpy.

Not a second reference: it mirrors the kernels step by step (torch's float32 resize index math, the
z-score, the double summed-area table with its padded pitch, four-corner box sums in the kernel's
order, float32 channel sums per chunk of the launch plan, the cascade maxima recovered from running
products, the fusion block and the keep-mask), so tests can check the ALGORITHM the GPU runs against
``realtime.defenses.spr`` on any machine. Vectorised over pixels; loops over channels as the kernel does.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from realtime.defenses import ChannelStats, Detection, FusionBlock, ZMaskConfig
from realtime.defenses.fusion import PARAM_NAMES

from .launch import DeviceLimits, LayerTable, check_batch, pack_layers, plan_pooled, sat_pitch

F32 = np.float32
H100 = DeviceLimits.for_arch((9, 0), 132)


def nearest_index(dst: np.ndarray, size_in: int, size_out: int) -> np.ndarray:
    """torch 'nearest': min(floor(dst * (float)in / out), in - 1), in float32."""
    scale = F32(size_in) / F32(size_out)
    return np.minimum(np.floor(dst.astype(F32) * scale).astype(np.int64), size_in - 1)


def linear_index(dst: np.ndarray, size_in: int, size_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch bilinear (align_corners=False) source indices i0, i1 and weights l0, l1, in float32."""
    scale = F32(size_in) / F32(size_out)
    src = np.maximum(scale * (dst.astype(F32) + F32(0.5)) - F32(0.5), F32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < size_in - 1)
    l1 = src - i0.astype(F32)
    return i0, i1, F32(1) - l1, l1


def resize_plane(plane: np.ndarray, size: Tuple[int, int], mode: str) -> np.ndarray:
    """A (h,w) float32 plane on the (HR,WR) grid as the kernels compute it ('same' bilinear, 'demo' nearest)."""
    y, x = np.arange(size[0]), np.arange(size[1])
    if mode == "demo":
        return plane[np.ix_(nearest_index(y, plane.shape[0], size[0]), nearest_index(x, plane.shape[1], size[1]))]
    y0, y1, ly0, ly1 = linear_index(y, plane.shape[0], size[0])
    x0, x1, lx0, lx1 = linear_index(x, plane.shape[1], size[1])
    top = lx0 * plane[np.ix_(y0, x0)] + lx1 * plane[np.ix_(y0, x1)]
    bot = lx0 * plane[np.ix_(y1, x0)] + lx1 * plane[np.ix_(y1, x1)]
    return ly0[:, None] * top + ly1[:, None] * bot


def windows(size: int, k: int, mode: str) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive first/last index of each output position's box along one axis."""
    i = np.arange(size)
    if mode == "same":
        return np.maximum(i - k // 2, 0), np.minimum(i + k // 2, size - 1)
    first = nearest_index(i, size - k + 1, size)
    return first, first + k - 1


def sat_of(z: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Summed-area table with a zero top row / left column and the kernel's padded pitch."""
    hr, wr = z.shape
    sat = np.zeros((hr + 1, sat_pitch(wr)), dtype)
    sat[1:, 1:wr + 1] = z.astype(dtype).cumsum(axis=1, dtype=dtype).cumsum(axis=0, dtype=dtype)
    return sat


def box_abs_mean(sat: np.ndarray, rows: Tuple[np.ndarray, np.ndarray], cols: Tuple[np.ndarray, np.ndarray]
                 ) -> np.ndarray:
    """|box mean| per pixel from four SAT corners, rows differenced first (the kernel's order)."""
    (ya, yb), (xa, xb) = rows, cols
    bot, top = sat[yb + 1], sat[ya]
    box = (bot[:, xb + 1] - bot[:, xa]) - (top[:, xb + 1] - top[:, xa])
    cnt = np.outer(yb - ya + 1, xb - xa + 1).astype(box.dtype)
    return np.abs((box / cnt).astype(F32))


def emulate_pooled(feature: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, kernels: Sequence[Tuple[int, int]],
                   work_size: Tuple[int, int], mode: str, chunk: int, eps: float = 1e-5,
                   sat_dtype: type = np.float64) -> np.ndarray:
    """``zm_pooled`` + the sum half of ``zm_reduce_layer``: pooled maps (N,K,HR,WR) float32.

    ``chunk``: channels per work item (float32 partial sums per chunk, then summed over chunks).
    ``sat_dtype=np.float32`` shows what a single-precision SAT would lose (tests use it)."""
    feat = feature.detach().cpu().float().numpy()
    m = mu.detach().cpu().float().numpy()
    den = sigma.detach().cpu().float().numpy() + F32(eps)
    n, c = feat.shape[:2]
    hr, wr = work_size
    wins = [(windows(hr, kh, mode), windows(wr, kw, mode)) for kh, kw in kernels]
    out = np.zeros((n, len(kernels), hr, wr), F32)
    for i in range(n):
        total = np.zeros((len(kernels), hr, wr), F32)
        for c0 in range(0, c, chunk):
            acc = np.zeros((len(kernels), hr, wr), F32)
            for ch in range(c0, min(c0 + chunk, c)):
                z = (resize_plane(feat[i, ch], (hr, wr), mode) - m[ch]) / den[ch]
                sat = sat_of(z, sat_dtype)
                for k, (rows, cols) in enumerate(wins):
                    acc[k] += box_abs_mean(sat, rows, cols)
            total += acc
        out[i] = total / F32(c)
    return out


def _cascade(p: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    """One sample's cascade as ``zm_reduce_layer`` + ``zm_fuse`` compute it (maxima from running products)."""
    qmax, q = [], None
    for j in range(len(idx) - 1):
        q = p[idx[0]] if j == 0 else q * p[idx[j]]
        qmax.append(F32(q.max()))
    heat, scale = p[idx[0]], F32(1)
    peak = qmax[0] if qmax else F32(0)
    for j in range(1, len(idx)):
        heat = heat / (F32(1) + peak) * p[idx[j]]
        scale = scale * (F32(1) + peak)
        if j + 1 < len(idx):
            peak = qmax[j] / scale
    return heat


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return F32(1) / (F32(1) + np.exp(-x))


def _table(cfg: ZMaskConfig) -> LayerTable:
    return pack_layers(cfg.shallow, cfg.deep, cfg.spr.kernels_shallow, cfg.spr.kernels_deep)


def emulate_heatmaps(cfg: ZMaskConfig, stats: ChannelStats, taps: Dict[str, torch.Tensor],
                     limits: DeviceLimits = H100, chunk: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(H_S, H_D), each (N,1,HR,WR) float32, chunked as ``plan_pooled`` would on ``limits``."""
    table = _table(cfg)
    n = check_batch(taps, cfg.layers)
    hr, wr = cfg.spr.work_size
    hs = hd = None
    for spec in table.layers:
        feat = taps[spec.name]
        plan = plan_pooled(n, feat.shape[1], (hr, wr), len(spec.kernels), limits, chunk=chunk)
        p = emulate_pooled(feat, stats.mu[spec.name], stats.sigma[spec.name], spec.kernels, (hr, wr), cfg.spr.mode,
                           plan.chunk)
        for idx, which in ((spec.shallow, "s"), (spec.deep, "d")):
            if not idx:
                continue
            h = np.stack([_cascade(p[i], idx) for i in range(n)])[:, None]
            if which == "s":
                hs = h if hs is None else np.maximum(hs, h)
            else:
                hd = h if hd is None else np.maximum(hd, h)
    assert hs is not None and hd is not None
    return hs, hd


def emulate_detect(cfg: ZMaskConfig, stats: ChannelStats, fusion: FusionBlock, taps: Dict[str, torch.Tensor],
                   size: Tuple[int, int], limits: DeviceLimits = H100, chunk: Optional[int] = None) -> Detection:
    """What ``fused_detect`` returns, computed with the kernels' arithmetic (torch tensors, CPU)."""
    hs, hd = emulate_heatmaps(cfg, stats, taps, limits, chunk)
    w = {k: F32(v) for k, v in fusion.to_dict().items() if k in PARAM_NAMES}
    g = _sigmoid(w["w1"] * np.tanh(w["w2"] * hd + w["b2"]) + w["b1"])
    soft = _sigmoid(w["w4"] * np.tanh(w["w3"] * (hs * g) + w["b3"]) + w["b4"]).astype(F32)
    a = (hs * hd * soft).astype(np.float64).sum(axis=(1, 2, 3))
    b = soft.astype(np.float64).sum(axis=(1, 2, 3))
    score = a.astype(F32) / (F32(1) + b.astype(F32))
    flagged = score > F32(cfg.lambda0)
    y, x = np.arange(size[0]), np.arange(size[1])
    hr, wr = cfg.spr.work_size
    if cfg.spr.mode == "same":
        up = np.stack([resize_plane(s[0], size, "same") for s in soft])
        hit = up > F32(cfg.mask_threshold)
    else:
        hit = (soft[:, 0] > F32(cfg.mask_threshold))[:, nearest_index(y, hr, size[0])][:, :, nearest_index(x, wr, size[1])]
    mask = np.where(hit & flagged[:, None, None], F32(0), F32(1))[:, None]
    t = torch.from_numpy
    return Detection(t(hs), t(hd), t(soft), t(score), t(flagged), t(mask.astype(F32)))


__all__ = ["H100", "box_abs_mean", "emulate_detect", "emulate_heatmaps", "emulate_pooled", "linear_index",
           "nearest_index", "resize_plane", "sat_of", "windows"]
