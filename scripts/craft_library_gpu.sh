#!/usr/bin/env bash
# Craft the committed patch library on one GPU: universal EOT patches S/M/L for both default models,
# all in parallel (each alone leaves most of an H100 idle), bf16 autocast, plus uniform-noise controls.
#   scripts/craft_library_gpu.sh DATA_DIR STEPS BATCH OUT_DIR
set -euo pipefail
DATA=$1; STEPS=$2; BATCH=$3; OUT=$4
mkdir -p "$OUT/library" "$OUT/logs"
export PYTHONUNBUFFERED=1
pids=()
for m in ddrnet23_slim bisenetv1; do
  for s in S M L; do
    python3 -m realtime.attacks.craft --model "$m" --data "$DATA" --size "$s" --steps "$STEPS" \
      --batch-size "$BATCH" --seed 0 --amp --quiet --out "$OUT/library/${m}_eot_${s}.png" > "$OUT/logs/${m}_${s}.log" 2>&1 &
    pids+=($!)
  done
  python3 -m realtime.attacks.craft --model "$m" --data "$DATA" --size L --random --seed 0 \
    --out "$OUT/library/${m}_random_L.png" > "$OUT/logs/${m}_random.log" 2>&1
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
tail -n 3 "$OUT"/logs/*.log
exit $rc
