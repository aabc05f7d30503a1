"""The live pipeline's stage clock."""
from __future__ import annotations

import time

import torch


class Clock:
    """perf_counter in ms, synchronising CUDA first so a stage's time is its own."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"

    def __call__(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter() * 1000.0


__all__ = ["Clock"]
