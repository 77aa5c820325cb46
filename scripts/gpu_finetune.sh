#!/usr/bin/env bash
# Fine-tuning on one GPU, all jobs at once: a baseline pruned to each searched policy in $DIR
# (GNN+RL, RL without the graph encoder, random, uniform), plus a control that keeps every channel
# (the baseline trained further with the same schedule, never distilled: it would copy itself).
# Every job plans $EPOCHS epochs. With CAP each job fits its own count to CAP seconds of training
# after its first epoch, so counts then differ between jobs (each log and checkpoint records its own).
# Usage (repo root, CIFAR-10 zips in $DATA):
#   OUT=/some/dir DATA=.data/cifar10 [DIR=...] [BASELINE=...] [EPOCHS=30] [DISTILL=0.5] [CAP=400] \
#     [BATCH=256] [LR=0.02] [MULTIPLE=16] [METHODS="gnn mlp"] [SEED=0] [EXTRA="--limit-per-class 10"] bash scripts/gpu_finetune.sh
set -u -o pipefail
PY=${PY:-python3}
EPOCHS=${EPOCHS:-30}
RUN=${RUN:-/tmp/finetune-run}
DIR=${DIR:-models/cnn/resnet56}    # search_<method>.json (and baseline.pt unless BASELINE says)
BASELINE=${BASELINE:-$DIR/baseline.pt}
METHODS=${METHODS:-gnn mlp random uniform keepall}
DISTILL=${DISTILL:-0}              # weight of distillation from the unpruned baseline
LR=${LR:-0.02}                     # peak learning rate of the warm-up + cosine schedule
BATCH=${BATCH:-256}                # images per step
SEED=${SEED:-0}                    # data order and augmentation of the fine-tuning
extra=()
[ -n "${CAP:-}" ] && extra+=(--max-seconds "$CAP")                # training seconds per job
[ -n "${MULTIPLE:-}" ] && extra+=(--channel-multiple "$MULTIPLE")  # default: the policy's own
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
mkdir -p "$RUN" "$OUT"
any_policy=$(ls "$DIR"/search_*.json | head -n 1)   # the control keeps every group of the same model
$PY -c "import json; keep = json.load(open('$any_policy'))['best_keep']; \
print(json.dumps({'best_keep': {group: 1.0 for group in keep}}))" > "$RUN/search_keepall.json"
for method in $METHODS; do
  policy=$DIR/search_$method.json
  distill=$DISTILL
  if [ "$method" = keepall ]; then policy=$RUN/search_keepall.json; distill=0; fi
  $PY -m compress.cli finetune --checkpoint "$BASELINE" --policy "$policy" --epochs "$EPOCHS" --lr "$LR" --batch-size "$BATCH" --seed "$SEED" \
    --distill "$distill" "${extra[@]}" --out "$RUN/finetuned_$method.pt" --data "$DATA" ${EXTRA:-} \
    > "$RUN/finetune_$method.log" 2>&1 &
done
wait
tail -n 2 "$RUN"/finetune_*.log
cp "$RUN"/finetune_*.log "$RUN"/finetuned_*.pt "$OUT/" 2>/dev/null
