#!/usr/bin/env bash
# Issue 18's comparisons, each in one lease of one GPU, every policy fine-tuned with the same recipe and
# its seed (scripts/gpu_finetune.sh, which logs the accuracy before and after), all processes sharing the
# GPU (ResNet-56's step is bound by kernel launches, not arithmetic), then the mean and standard deviation
# per method (scripts/compare_summary.py):
#   methods   (item 2) the 50% FLOPs comparison: every method searched on BASELINE with each seed of SEEDS
#             (uniform and depgraph once: they draw nothing at random), plus the keep-every-channel control;
#   source    (item 3, first half; needs no BASELINE) a ResNet-20 is trained (its search images held out)
#             and the GNN agent and the agent without the graph encoder (mlp) are searched on it per seed;
#   transfer  (item 3) `source` unless done, then each agent proposes BASELINE's policy without search
#             (`compress transfer`), beside a random policy per seed at the same budget (a one-episode
#             random search on BASELINE).
# A step whose output exists is not run again, so an experiment stopped midway resumes where it stopped.
# Usage (repo root; carry .data and .gpu as for scripts/gpu_baseline.sh):
#   OUT=/some/dir BASELINE=resnet56.pt [DATA=/tmp/cifar10] [SEEDS="0 1 2"] [TARGET=0.5] [EPISODES=96] \
#     [EPOCHS=30] [BATCH=256] [LR=0.02] [DISTILL=0.5] [JOBS=12] [METHODS="gnn mlp random uniform depgraph"] \
#     [SOURCE_EPOCHS=60] [EXTRA="--limit-per-class 10"] bash scripts/gpu_compare.sh methods|source|transfer
# Either takes longer than one call of the lent machine (10 minutes): start it in a session of its own
# (`setsid nohup bash scripts/gpu_compare.sh methods > /root/methods.log 2>&1 &`, or all of issue 18's
# lease at once: scripts/device_gpu_side.sh compare) and keep the machine warm with calls that wait and
# show the logs (it is given back 30 s after a call ends); OUT then holds <experiment>.md,
# <experiment>.json and <experiment>-run.tgz (logs and policies, no checkpoints).
# Checked on the CPU with SEEDS="0 1" EPISODES=2 EPOCHS=1 SOURCE_EPOCHS=1 EXTRA="--limit-per-class 10".
set -u -o pipefail
EXPERIMENT=$1
PY=${PY:-python3}
case $EXPERIMENT in source) RUN=${RUN:-/tmp/transfer-run} ;; *) RUN=${RUN:-/tmp/$EXPERIMENT-run} ;; esac
DATA=${DATA:-/tmp/cifar10}
SEEDS=${SEEDS:-0 1 2}
TARGET=${TARGET:-0.5}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=${GPU_SITE:-$PWD/.gpu/site}:$PWD
mkdir -p "$RUN" "$OUT"
first=${SEEDS%% *}

at_most_jobs() {  # run "$@" in the background once fewer than JOBS jobs are running
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-12}" ]; do wait -n; done
  "$@" &
}
search() {  # CHECKPOINT DIR SEED METHOD [EPISODES]: DIR/search_METHOD.json (and .agent.pt for an agent)
  mkdir -p "$2"
  [ ! -f "$2/search_$4.json" ] || return 0
  $PY -m compress.cli search --checkpoint "$1" --target "$TARGET" --method "$4" --episodes "${5:-${EPISODES:-96}}" \
    --seed "$3" --out-dir "$2" --data "$DATA" $EXTRA > "$2/search_$4.log" 2>&1
}
finetune_all() {  # METHODS: each seed's policies in RUN/s<seed>/search_<method>.json, all seeds at once
  for seed in $SEEDS; do
    dir=$RUN/s$seed  # gpu_finetune.sh reads the policies here and leaves its logs here
    OUT=$dir RUN=$dir/ft DIR=$dir BASELINE=$BASELINE SEED=$seed METHODS="$1" EPOCHS=${EPOCHS:-30} \
      DISTILL=${DISTILL:-0.5} LR=${LR:-0.02} BATCH=${BATCH:-256} DATA=$DATA EXTRA=$EXTRA PY=$PY \
      bash scripts/gpu_finetune.sh > "$dir/finetune.log" 2>&1 &
  done
  wait
}

case $EXPERIMENT in
methods)
  METHODS=${METHODS:-gnn mlp random uniform depgraph}
  for seed in $SEEDS; do
    for method in $METHODS; do
      case $method in uniform|depgraph) [ "$seed" = "$first" ] || continue ;; esac
      at_most_jobs search "$BASELINE" "$RUN/s$seed" "$seed" "$method"
    done
  done
  wait
  for seed in $SEEDS; do
    for method in uniform depgraph; do
      [ "$seed" = "$first" ] || [ ! -f "$RUN/s$first/search_$method.json" ] || cp "$RUN/s$first/search_$method.json" "$RUN/s$seed/"
    done
  done
  finetune_all "$METHODS keepall"
  ;;
source|transfer)
  source=$RUN/source
  mkdir -p "$source"
  [ -f "$source/resnet20.pt" ] || $PY -m compress.cli train --arch resnet20 --epochs "${SOURCE_EPOCHS:-60}" \
    --out "$source/resnet20.pt" --data "$DATA" $EXTRA > "$source/train_resnet20.log" 2>&1 ||
    { tail -n 3 "$source/train_resnet20.log"; exit 1; }
  for seed in $SEEDS; do
    for agent in gnn mlp; do at_most_jobs search "$source/resnet20.pt" "$source/s$seed" "$seed" "$agent"; done
  done
  wait
  [ "$EXPERIMENT" = transfer ] || exit 0
  for seed in $SEEDS; do at_most_jobs search "$BASELINE" "$RUN/s$seed" "$seed" random 1; done
  wait
  for seed in $SEEDS; do
    for agent in gnn mlp; do
      $PY -m compress.cli transfer --agent "$source/s$seed/search_$agent.agent.pt" --checkpoint "$BASELINE" \
        --target "$TARGET" --out "$RUN/s$seed/search_transfer-$agent.json" > "$RUN/s$seed/transfer_$agent.log" 2>&1
    done
  done
  finetune_all "transfer-gnn transfer-mlp random"
  ;;
*) echo "usage: bash scripts/gpu_compare.sh methods|source|transfer" >&2; exit 2 ;;
esac
$PY scripts/compare_summary.py "$RUN" --out "$OUT" --name "$EXPERIMENT" --baseline "$BASELINE"
(cd "$RUN" && tar czf "$OUT/$EXPERIMENT-run.tgz" --exclude='*.pt' .)
