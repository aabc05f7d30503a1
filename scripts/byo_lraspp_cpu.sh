#!/usr/bin/env bash
# "Your model, your footage", worked end to end on the 2-core CPU: torchvision's LRASPP-MobileNetV3 (a
# network this project did not design) trained on CamVid here, then calibrated twice with the same
# recipe and crafting budget -- with labels (CamVid train frames, calibration patches crafted here against
# the labels) and from a video of the same frames with no labels (patches crafted against the model's own
# predictions) -- and both evaluated on all val frames against the library patches, which neither saw.
# Writes realtime/models/weights/lraspp_mobilenet_v3_large_camvid.pt, library patches, two calibrations
# and benchmarks/results/byo/. Every step resumes or is cheap to redo; run from the repository root.
set -euo pipefail
PY=${PY:-.venv/bin/python}
M=torchvision:lraspp_mobilenet_v3_large
W=realtime/models/weights/lraspp_mobilenet_v3_large_camvid.pt
S=torchvision-lraspp_mobilenet_v3_large           # the file-name slug of $M (realtime.models.model_slug)
DATA=${REALTIME_DATA:-../shared/datasets/camvid}
STEPS=${STEPS:-300}                               # the library (test) patches
CRAFT="--craft-steps 150 --time-budget ${BUDGET:-600} --seed 7"   # each calibration's own patches: same budget for both,
# and another seed than the library's 0 (same frames and seed would retrace the test patch's first steps)

# 1. train (resumes from runs/lraspp/last.pt)
[ -f "$W" ] || $PY -m realtime.train --model $M --base-scale 0.5 --crop 180x240 --batch-size 8 --epochs 10 \
    --eval-every 5 --precise-bn 184 --out runs/lraspp --export $W
# 2. the test attack: universal EOT patches crafted WITH the CamVid labels (the patch library)
for s in S M L; do
  [ -f realtime/attacks/library/${S}_eot_$s.png ] || $PY -m realtime.attacks.craft --model $M --weights $W \
      --size $s --steps $STEPS --batch-size 4 --out realtime/attacks/library/${S}_eot_$s.png --quiet
done
# 3a. calibration with labels: CamVid train frames, EOT S/M/L crafted against the labels (+ noise, half contrast)
$PY -m calibration.fit --model $M --weights $W --sources craft $CRAFT --out calibration/shipped/$S.safetensors \
    --report-dir benchmarks/results/calibration/$S
# 3b. calibration from unlabeled footage: the same frames as a video, patches crafted on pseudo-labels
$PY scripts/frames_to_video.py "$DATA/train" runs/footage_train.mp4
$PY -m calibration.fit --model $M --weights $W --frames runs/footage_train.mp4 $CRAFT \
    --out calibration/shipped/${S}_footage.safetensors --report-dir benchmarks/results/calibration/${S}_footage
# 4. both on val against the labelled EOT S/M/L patches
for cal in $S ${S}_footage; do
  $PY -m benchmarks.robustness --model $M --weights $W --calibration calibration/shipped/$cal.safetensors \
      --defenses none,zmask --conditions none,eot_S,eot_M,eot_L --every 1 --out-dir benchmarks/results/byo/$cal --quiet
done
