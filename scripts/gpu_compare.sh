#!/usr/bin/env bash
# The 50% FLOPs comparison on equal terms (issue 18, item 2), in one lease of one GPU: from one baseline,
# every method searched with each seed of SEEDS (uniform and depgraph once: they draw nothing at random,
# so their one policy serves every seed), then every policy fine-tuned with the same recipe and that seed
# (scripts/gpu_finetune.sh per seed, with its keep-every-channel control), all seeds at once, and the
# mean and standard deviation per method (scripts/compare_summary.py). ResNet-56's step is bound by
# kernel launches, not arithmetic, so many processes share the GPU well.
# Usage (repo root; carry .data and .gpu as for scripts/gpu_baseline.sh):
#   OUT=/some/dir BASELINE=ckpt.pt [DATA=/tmp/cifar10] [SEEDS="0 1 2"] [METHODS="gnn mlp random uniform depgraph"]
#     [TARGET=0.5] [EPISODES=96] [EPOCHS=30] [DISTILL=0.5] [JOBS=12] [EXTRA="--limit-per-class 10"] \
#     bash scripts/gpu_compare.sh
# It takes longer than one call of the lent machine (10 minutes): start it in a session of its own
# (`setsid nohup bash scripts/gpu_compare.sh > /root/compare.log 2>&1 &`) and keep the machine warm with
# calls that wait and show the logs (it is given back 30 s after a call ends); OUT then holds compare.md,
# compare.json and compare-run.tgz (logs and policies; the fine-tuned checkpoints stay behind).
# Checked on the CPU with SEEDS="0 1" EPISODES=2 EPOCHS=1 EXTRA="--limit-per-class 10".
set -u -o pipefail
PY=${PY:-python3}
RUN=${RUN:-/tmp/compare-run}
DATA=${DATA:-/tmp/cifar10}
SEEDS=${SEEDS:-0 1 2}
METHODS=${METHODS:-gnn mlp random uniform depgraph}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=${GPU_SITE:-$PWD/.gpu/site}:$PWD
mkdir -p "$RUN" "$OUT"
first=${SEEDS%% *}

at_most_jobs() {  # run "$@" in the background once fewer than JOBS jobs are running
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-12}" ]; do wait -n; done
  "$@" &
}
search() {  # SEED METHOD
  mkdir -p "$RUN/s$1"
  $PY -m compress.cli search --checkpoint "$BASELINE" --target "${TARGET:-0.5}" --method "$2" \
    --episodes "${EPISODES:-96}" --seed "$1" --out-dir "$RUN/s$1" --data "$DATA" $EXTRA > "$RUN/s$1/search_$2.log" 2>&1
}

for seed in $SEEDS; do
  for method in $METHODS; do
    case $method in uniform|depgraph) [ "$seed" = "$first" ] || continue ;; esac
    at_most_jobs search "$seed" "$method"
  done
done
wait
for seed in $SEEDS; do
  for method in uniform depgraph; do
    [ "$seed" = "$first" ] || [ ! -f "$RUN/s$first/search_$method.json" ] || cp "$RUN/s$first/search_$method.json" "$RUN/s$seed/"
  done
done
for seed in $SEEDS; do
  dir=$RUN/s$seed  # gpu_finetune.sh reads the policies here and leaves its logs here
  OUT=$dir RUN=$dir/ft DIR=$dir BASELINE=$BASELINE SEED=$seed METHODS="$METHODS keepall" \
    EPOCHS=${EPOCHS:-30} DISTILL=${DISTILL:-0.5} DATA=$DATA EXTRA=$EXTRA PY=$PY \
    bash scripts/gpu_finetune.sh > "$dir/finetune.log" 2>&1 &
done
wait
$PY scripts/compare_summary.py "$RUN" --out "$OUT"
(cd "$RUN" && tar czf "$OUT/compare-run.tgz" --exclude='*.pt' .)
