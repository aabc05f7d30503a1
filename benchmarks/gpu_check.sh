#!/usr/bin/env bash
# One command for a GPU machine: every GPU test, the fused-kernel micro-benchmark, and (when present)
# the latency suite on CUDA. Extra arguments go to benchmarks.kernel_bench. Exit status: non-zero if
# any step failed (all steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch; nothing to check here." >&2
    exit 2
fi
"$PY" -c "import kernels; print('fused kernels:', kernels.available())"
status=0
# GPU tests: the fused-kernel parity tests plus any other test module that looks for a CUDA device.
mapfile -t gpu_tests < <( { echo tests/test_kernels_gpu.py; grep -l "cuda.is_available" tests/test_*.py; } | sort -u)
echo "== pytest ${gpu_tests[*]}"
"$PY" -m pytest -q -rs "${gpu_tests[@]}" tests/test_kernels_compile.py || status=1
echo "== kernel micro-benchmark"
"$PY" -m benchmarks.kernel_bench "$@" || status=1
if "$PY" -c "import benchmarks.latency" 2>/dev/null; then
    echo "== latency suite (cuda)"
    "$PY" -m benchmarks.latency --suite --device cuda || status=1
fi
exit $status
