"""Fused CUDA kernels for the defense's hot path (z-score + cascaded average pools), with the
plain-torch reference in ``realtime.defenses`` as the CPU path and the oracle. GPU-only
dependencies (cupy, pycuda) are imported lazily."""
