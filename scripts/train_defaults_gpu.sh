#!/usr/bin/env bash
# Train both default models concurrently on one GPU (they are too small to fill an H100 alone),
# detached so the run outlives one remote command; `wait` polls, then copies fp16 weights out.
#   scripts/train_defaults_gpu.sh start DATA_DIR EPOCHS
#   scripts/train_defaults_gpu.sh wait  MAX_SECONDS OUT_DIR
set -euo pipefail
RUNS=${RUNS:-/tmp/runs}
MODELS="ddrnet23_slim bisenetv1"
export PYTHONUNBUFFERED=1
case "$1" in
  start)
    mkdir -p "$RUNS"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RUNS/gpu.txt"
    for m in $MODELS; do
      setsid nohup python3 -m realtime.train --model "$m" --data "$2" --out "$RUNS/$m" \
        --epochs "$3" --batch-size 16 --eval-every 10 --no-deterministic \
        --export "$RUNS/${m}_camvid.pt" > "$RUNS/$m.log" 2>&1 < /dev/null &
    done
    ;;
  wait)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && pgrep -f realtime.train > /dev/null; do sleep 10; done
    for m in $MODELS; do
      echo "== $m"; grep -E '^\{|exported|Error|error' "$RUNS/$m.log" | tail -n 8 || true
      cp "$RUNS/$m.log" "$3/" 2>/dev/null || true
      if [ -f "$RUNS/${m}_camvid.pt" ]; then cp "$RUNS/${m}_camvid."{pt,json} "$3/"
      elif [ -f "$RUNS/$m/best.pt" ]; then   # interim: best so far, as fp16 (fits the copy-back limit)
        python3 -c "import torch,sys; s=torch.load(sys.argv[1],weights_only=True); \
torch.save({k:(v.half() if v.is_floating_point() else v) for k,v in s['model'].items()}, sys.argv[2])" \
          "$RUNS/$m/best.pt" "$3/${m}_best_interim.pt"
      fi
    done
    ;;
esac
