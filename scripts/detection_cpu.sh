#!/usr/bin/env bash
# Detection track end to end on a 2-core CPU, after `python -m realtime.train_detection --model fcos_ddrnet
# --epochs 28 --eval-every 4 --export default` (~35 min): library patches -> Z-Mask calibration -> benchmark.
#   scripts/detection_cpu.sh [DATA_DIR] [STEPS]   (skips what already exists; logs in runs/detection/)
set -euo pipefail
DATA=${1:-${REALTIME_DATA:-../shared/datasets/camvid}}; STEPS=${2:-300}
PY=${PY:-.venv/bin/python}; M=fcos_ddrnet; LIB=realtime/attacks/library
mkdir -p runs/detection
craft() {  # kind size steps [extra args]
  local out=$LIB/${M}_$1_$2.png
  [ -f "$out" ] && return 0
  $PY -m realtime.attacks.craft_detection --model $M --data "$DATA" --kind "$1" --size "$2" --steps "$3" \
    --batch-size 4 --seed 0 --resume --quiet "${@:4}" > "runs/detection/craft_$1_$2.log" 2>&1
  tail -n 1 "runs/detection/craft_$1_$2.log"
}
craft random L 0
craft eot L "$STEPS"
craft apricot L "$STEPS" --target-class car
# calibrate before the S/M patches exist: the block sees noise S/M/L and the EOT L patch (full and half
# contrast) only, so eot_S, eot_M and apricot_L are unseen attacks in the benchmark
[ -f calibration/shipped/$M.safetensors ] || $PY -m calibration.fit --model $M --data "$DATA" --work-scale 0.5 \
  --fit-frames 120 --batch-size 4 --mask-threshold auto > runs/detection/calibration.log 2>&1
tail -n 3 runs/detection/calibration.log
craft eot M "$STEPS"
craft eot S "$STEPS"
$PY -m benchmarks.robustness --model $M --data "$DATA" --split val --resume
