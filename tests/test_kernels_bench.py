"""benchmarks/kernel_bench.py on a CPU machine: a clear exit without CUDA, and its report formatting."""
from __future__ import annotations

import pytest
import torch

from benchmarks import kernel_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_exits_clearly_without_cuda(capsys: pytest.CaptureFixture) -> None:
    assert kernel_bench.main(["--iters", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_markdown_report() -> None:
    run = {"scenario": "camvid-360x480", "batch": 1, "dtype": "float32", "reference": {"median_ms": 2.0},
           "fused": {"median_ms": 0.25}, "speedup": 8.0, "fused_GBps": 30.0, "rel_err": {"h_s": 2e-6, "score": 5e-6},
           "sat_in_shared_memory": [True, True]}
    md = kernel_bench.markdown({"device": "NVIDIA H100", "torch": "2.x", "cuda": "13.0", "backend": "cupy",
                                "copy_GBps": 3000.0, "iters": 200, "warmup": 20, "runs": [run]})
    assert "NVIDIA H100" in md and "| camvid-360x480 | 1 | float32 | 2.000 | 0.250 | 8.0x | 30 | 1.0% | 5.0e-06 | yes |" in md
