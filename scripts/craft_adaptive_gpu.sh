#!/usr/bin/env bash
# Craft the beta-controlled sweep (and with DEFENSE_AWARE=1 the Adv-Mask / Adv-Flag) L patches for both
# default models against their shipped Z-Mask calibrations, all in parallel on one GPU.
#   scripts/craft_adaptive_gpu.sh DATA_DIR STEPS BATCH OUT_DIR
set -euo pipefail
DATA=$1; STEPS=$2; BATCH=$3; OUT=$4
mkdir -p "$OUT/library" "$OUT/logs"
export PYTHONUNBUFFERED=1
pids=()
run() {  # name, extra args...
  local name=$1; shift
  python3 -m realtime.attacks.craft --data "$DATA" --size L --steps "$STEPS" --batch-size "$BATCH" --seed 0 \
    --amp --quiet --out "$OUT/library/$name.png" "$@" > "$OUT/logs/$name.log" 2>&1 &
  pids+=($!)
}
for m in ddrnet23_slim bisenetv1; do
  cal=calibration/shipped/$m.safetensors
  for b in 0.1 0.3 0.5 0.7 0.9; do run "${m}_beta${b}_L" --model "$m" --calibration "$cal" --beta "$b"; done
  if [ "${DEFENSE_AWARE:-0}" = 1 ]; then
    for k in mask flag; do run "${m}_adv-${k}0.5_L" --model "$m" --calibration "$cal" --defense-aware "$k" --alpha 0.5; done
  fi
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
tail -qn 1 "$OUT"/logs/*.log
exit $rc
