"""Benchmarks: accuracy (mIoU), robustness under attack, latency."""
