#!/usr/bin/env bash
# One command for a GPU machine: every GPU test, the fused-kernel micro-benchmark, and (when present)
# the latency suite on CUDA. Extra arguments go to benchmarks.kernel_bench. Exit status: non-zero if
# any step failed (all steps still run).
#   benchmarks/gpu_check.sh                       # everything
#   PARTS=tests,kernels benchmarks/gpu_check.sh   # a subset (tests, kernels, latency), e.g. to fit a
#   RESOLUTIONS="360x480 720x960" PARTS=latency benchmarks/gpu_check.sh   # per-command time limit
set -uo pipefail
PARTS="${PARTS:-tests,kernels,latency}"
want() { [[ ",$PARTS," == *",$1,"* ]]; }
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
if want tests; then
    mapfile -t gpu_tests < <( { echo tests/test_kernels_gpu.py; grep -l "cuda.is_available" tests/test_*.py; } | sort -u)
    echo "== pytest ${gpu_tests[*]}"
    "$PY" -m pytest -q -rs "${gpu_tests[@]}" tests/test_kernels_compile.py || status=1
fi
if want kernels; then
    echo "== kernel micro-benchmark"
    "$PY" -m benchmarks.kernel_bench "$@" || status=1
fi
if want latency; then
    echo "== latency suite (cuda, fused kernel)"
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.latency --suite --device cuda --kernel auto ${RESOLUTIONS:+--resolutions $RESOLUTIONS} || status=1
fi
exit $status
