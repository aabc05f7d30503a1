#!/usr/bin/env bash
# One command for a GPU machine: every GPU test (fused kernels, the live step's CUDA-event clock with no
# synchronize), the fused-kernel micro-benchmark, the live pipeline on CUDA (one stream and two batched
# streams, fused kernels) and the latency suite on CUDA (with the 4-stream batched vs serial entry). Extra arguments go to benchmarks.kernel_bench. Exit status: non-zero if
# any step failed (all steps still run).
#   benchmarks/gpu_check.sh                       # everything
#   PARTS=tests,kernels benchmarks/gpu_check.sh   # a subset (tests, kernels, live, latency), e.g. to fit a
#   RESOLUTIONS="360x480 720x960" PARTS=latency benchmarks/gpu_check.sh   # per-command time limit
set -uo pipefail
PARTS="${PARTS:-tests,kernels,live,latency}"
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
if want live; then
    echo "== live pipeline on cuda: one stream, then two batched streams (--kernels fused)"
    out="${TMPDIR:-/tmp}/gpu_check_live"
    mkdir -p "$out"
    "$PY" -m realtime.run --device cuda --kernels fused --source demo --max-frames 60 --quiet \
        --output "$out/one.mp4" || status=1
    "$PY" -m realtime.run --device cuda --kernels fused --source demo --source demo --max-frames 60 --quiet \
        --output "$out/two.mp4" || status=1
    "$PY" - "$out" <<'PYEOF' || status=1
import json, sys
one = json.load(open(f"{sys.argv[1]}/one.summary.json")); two = json.load(open(f"{sys.argv[1]}/two.summary.json"))
print(f"live cuda: one stream {one['fps']} FPS, kernels {one.get('kernels')}; two batched streams {two['fps']} FPS "
      f"over both (mean batch {two['mean_batch']}); compute p50 ms one {one['latency_ms']['compute']['p50']}, "
      f"two {two['streams'][0]['latency_ms']['compute']['p50']}")
PYEOF
fi
if want latency; then
    echo "== latency suite (cuda, fused kernel)"
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.latency --suite --device cuda --kernels auto --streams 4 ${RESOLUTIONS:+--resolutions $RESOLUTIONS} || status=1
fi
exit $status
