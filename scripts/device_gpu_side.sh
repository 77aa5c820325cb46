#!/usr/bin/env bash
# Issue 18's GPU work in the background of a lent machine's CPU benchmarks (scripts/device_spec16.sh):
# the GPU idles while the 16 cores benchmark, so compress's training runs beside them on cores that the
# benchmark's ranks (pinned from core 0 up) leave free, after issue 16's distillation has had the GPU:
#   cap:      scripts/jpeg_cap.py, airbench's recipes on the JPEG copy of CIFAR-10 (what the copy costs);
#   baseline: scripts/gpu_baseline.sh, the ResNet-56 baseline, resumable (its state comes back for the
#             next lease: put it at .gpu/state.pt and start again).
#   compare:  a whole lease of issue 18 on every core: the baseline finished beside the transfer
#             experiment's source (scripts/gpu_compare.sh source), then the methods comparison on that
#             baseline, then the transfer experiment (settings: gpu_compare.sh's variables).
# Carry .data (the JPEG copy packed with xz, see gpu_baseline.sh) and .gpu (site/: torch_pruning, airbench).
#   bash scripts/device_gpu_side.sh cap | baseline | compare   # return at once; the work runs on in its own session
#   bash scripts/device_gpu_side.sh collect   # logs and JSON as $OUT/gpu.tgz, state and checkpoints in $OUT/gpu/
set -euo pipefail
WORK=/root/gpuside
CORES=${GPU_SIDE_CORES:-13-15}
in_background() {  # $1: name; the rest: the command, run from here on the side cores in a session of its own
  local name=$1; shift
  mkdir -p $WORK/out
  setsid nohup taskset -c "$CORES" env PYTHONUNBUFFERED=1 PYTHONPATH=$WORK/site:$PWD GPU_SITE=$WORK/site "$@" \
    > $WORK/out/$name.log 2>&1 < /dev/null &
  echo "$name started on cores $CORES"
}
adopt_state() {  # the resumable baseline state an earlier lease left, if this call carried it in .gpu
  [ -f $WORK/state.pt ] || [ ! -f .gpu/state.pt ] || cp .gpu/state.pt $WORK/state.pt
}
mkdir -p /tmp/cifar10 $WORK
[ ! -d .gpu/site ] || cp -r .gpu/site $WORK/  # a later call may not carry .gpu: the jobs read their own copy
[ -d /tmp/cifar10/train ] || tar -C /tmp/cifar10 -xJf .data/cifar10-jpeg.tar.xz
case "$1" in
cap)
  in_background jpeg-cap python3 scripts/jpeg_cap.py --data /tmp/cifar10 --runs "${CAP_RUNS:-5}" \
    --variants "${CAP_VARIANTS:-94,96}" --out $WORK/out/jpeg-cap.json
  ;;
baseline)
  adopt_state
  in_background baseline bash "$0" baseline-steps
  ;;
baseline-steps)  # what `baseline` runs: the papers'-recipe ResNet-56 (its own settings, never a comparison's)
  OUT=$WORK/out STATE=$WORK/state.pt STOP=100000 HARD=100000 BUDGET=1000 BATCH=256 LR=0.2 EPOCHS=200 \
    bash scripts/gpu_baseline.sh
  ;;
compare)
  adopt_state
  CORES=${GPU_SIDE_CORES:-0-15} in_background compare bash "$0" compare-steps
  ;;
compare-steps)  # what `compare` runs
  bash "$0" baseline-steps > $WORK/out/baseline.log 2>&1 &
  OUT=$WORK/out bash scripts/gpu_compare.sh source
  wait
  [ -f $WORK/out/baseline.pt ] || { echo "no baseline"; exit 1; }
  OUT=$WORK/out BASELINE=$WORK/out/baseline.pt bash scripts/gpu_compare.sh methods
  OUT=$WORK/out BASELINE=$WORK/out/baseline.pt bash scripts/gpu_compare.sh transfer
  ;;
collect)  # $OUT/gpu.tgz: logs, JSON and tables, the comparisons' so far; $OUT/gpu/: the resumable state,
  # the checkpoints (baseline, ResNet-20, first seed's fine-tuned models) and the searched agents
  mkdir -p "$OUT/gpu"
  tar czf "$OUT/gpu.tgz" --exclude='*.pt' -C / "${WORK#/}/out" tmp/methods-run tmp/transfer-run 2>/dev/null || true
  cp $WORK/state.pt $WORK/out/baseline.pt "$OUT/gpu/" 2>/dev/null || true
  (cd / && find tmp/methods-run tmp/transfer-run \( -name '*.agent.pt' -o -name resnet20.pt -o -path '*/s0/ft/*.pt' \) \
    -print0 2>/dev/null | tar czf "$OUT/gpu/models.tgz" --null -T -) || true
  tail -3 $WORK/out/train.log 2>/dev/null || true
  ;;
esac
