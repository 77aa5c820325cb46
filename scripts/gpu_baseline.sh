#!/usr/bin/env bash
# A papers'-level baseline (ResNet-56 by default: SGD + Nesterov, lr 0.1, batch 128, weight decay
# 5e-4, warm-up + cosine, all 50,000 training images) on the lent GPU, in calls of under 10 minutes
# that resume from a state file. Run the same command until $OUT holds baseline.pt; after each call
# copy $OUT/state.pt back to $STATE (the device machine starts bare).
#
# What travels: ../shared does not, and the repository plus the two JPEG zips (65 MB) exceed the
# 64 MiB a call carries, so the JPEG files are packed once with xz (18.5 MB; the same files, so the
# same pixels) into the git-ignored .data/, and torch-pruning (not in the GPU image) is copied into
# the git-ignored .gpu/site:
#   (cd /tmp && unzip -q -o $REPO/../shared/datasets/cifar10/cifar10-train.zip && unzip -q -o \
#     $REPO/../shared/datasets/cifar10/cifar10-test.zip && tar -cf - train test) | xz -9e > .data/cifar10-jpeg.tar.xz
#   mkdir -p .gpu/site && cp -r .venv/lib/python3*/site-packages/torch_pruning .gpu/site/
# Usage (repo root; carry .data and .gpu): OUT=/some/dir bash scripts/gpu_baseline.sh
#   [STATE=.gpu/state.pt] [STOP=540 seconds per call] [BUDGET=1150 training seconds over all calls]
#   [ARCH=resnet56] [EPOCHS=200] [BATCH=128] [LR=0.1] [WD=5e-4] [HOLDOUT=0] [SEED=0]
set -u -o pipefail
PY=${PY:-python3}
STATE=${STATE:-.gpu/state.pt}
DATA=${DATA:-/tmp/cifar10}
export PYTHONUNBUFFERED=1 PYTHONPATH=${GPU_SITE:-$PWD/.gpu/site}:$PWD
mkdir -p "$OUT" "$DATA"
[ -d "$DATA/train" ] || tar -C "$DATA" -xJf .data/cifar10-jpeg.tar.xz || exit 1
nvidia-smi -L
$PY -c "import torch, torch_pruning; print('torch', torch.__version__, 'tp', torch_pruning.__version__)"
timeout "${HARD:-585}" $PY -m compress.cli train --arch "${ARCH:-resnet56}" --epochs "${EPOCHS:-200}" \
  --batch-size "${BATCH:-128}" --lr "${LR:-0.1}" --weight-decay "${WD:-5e-4}" --warmup-epochs 2 \
  --holdout "${HOLDOUT:-0}" --compile --max-seconds "${BUDGET:-1150}" --state "$STATE" \
  --stop-after "${STOP:-540}" --seed "${SEED:-0}" --data "$DATA" --out "$OUT/baseline.pt" 2>&1 | tee "$OUT/train.log"
cp "$STATE" "$OUT/state.pt"
