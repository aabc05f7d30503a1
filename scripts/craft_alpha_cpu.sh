#!/usr/bin/env bash
# Defense-aware alpha sweep (Adv-Mask / Adv-Flag) for both default models, warm-started from each
# model's crafted EOT L patch, sized for a CPU: STEPS steps at batch 4 over the first 120 train frames.
#   [MODELS="ddrnet23_slim"] scripts/craft_alpha_cpu.sh [DATA_DIR] [STEPS]    -> realtime/attacks/library/<model>_adv{mask,flag}_a<alpha>_L.png
set -euo pipefail
DATA=${1:-${REALTIME_DATA:-../shared/datasets/camvid}}; STEPS=${2:-100}; MODELS=${MODELS:-ddrnet23_slim bisenetv1}
PY=${PY:-.venv/bin/python}
mkdir -p runs/alpha
for m in $MODELS; do
  for a in 0.25 0.75; do
    for k in mask flag; do
      out=realtime/attacks/library/${m}_adv${k}_a${a}_L.png
      [ -f "$out" ] && continue
      $PY -m realtime.attacks.craft --model "$m" --data "$DATA" --size L --steps "$STEPS" --batch-size 4 \
        --limit 120 --seed 0 --defense-aware "$k" --alpha "$a" --calibration "calibration/shipped/$m.safetensors" \
        --init "realtime/attacks/library/${m}_eot_L.png" --checkpoint-every 10 --resume --quiet --out "$out" \
        > "runs/alpha/${m}_adv${k}_a${a}.log" 2>&1
      tail -n 1 "runs/alpha/${m}_adv${k}_a${a}.log"
    done
  done
done
