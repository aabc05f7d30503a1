"""Fused CUDA kernels for the defense's hot path: Z-Mask's heatmaps (resize, z-score, every SPR box
filter from one summed-area table, channel means, cascades) and detection in 2L+3 launches.

The plain-torch reference in ``realtime.defenses`` stays the CPU path and the oracle. GPU-only
dependencies (CuPy, pycuda) are imported lazily: ``available()`` says whether the kernels can run.
"""
from .backend import BACKENDS, FusedRouter, heatmap_backend
from .fused import FusedZMask, engine_for, fused_detect, fused_heatmaps
from .runtime import KernelsUnavailable, available

__all__ = ["BACKENDS", "FusedRouter", "FusedZMask", "heatmap_backend", "KernelsUnavailable", "available", "engine_for", "fused_detect", "fused_heatmaps"]
