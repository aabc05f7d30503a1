"""One thread-pool policy for torch and onnxruntime in the same process (CPU).

Both runtimes keep their own pool. Sized independently (ORT's default is one thread per core, torch's
too) and with ORT's workers spinning between calls, the two pools fight over the same cores on every
frame: on the loaded 2-core machine the onnxruntime path with torch heatmaps degraded about 4x. The
policy: ONE size ``n`` for both (``threads``, else torch's current setting), ORT workers that sleep
instead of spinning when idle, no inter-op pool (sequential execution) in ORT. With the defended
graph the heatmaps run inside ORT, so per frame torch only does the small host-side steps.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def pool_size(threads: Optional[int] = None) -> int:
    """The pool size both runtimes use: ``threads`` (and torch is set to it), else torch's current size."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if torch.get_num_threads() != threads:
            torch.set_num_threads(int(threads))
        return int(threads)
    return int(torch.get_num_threads())


def session_options(ort: Any, threads: Optional[int] = None, device_type: str = "cpu") -> Any:
    """``ort.SessionOptions`` under the policy (full graph optimisation, quiet logging)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if device_type == "cpu" or threads is not None:
        opts.intra_op_num_threads = pool_size(threads)
    # Idle ORT workers must sleep, not spin: torch runs right after each session call on the same cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


__all__ = ["pool_size", "session_options"]
