#!/usr/bin/env bash
# Equal fine-tuning on one GPU: ResNet-56 pruned to each searched policy in models/cnn/resnet56/
# (GNN+RL, RL without the graph encoder, random, uniform), plus a control that keeps every channel
# (the baseline trained further with the same schedule), all for the same number of epochs.
# Usage (repo root, CIFAR-10 zips in $DATA): OUT=/some/dir DATA=.data/cifar10 EPOCHS=30 bash compress/gpu_finetune.sh
set -u -o pipefail
PY=${PY:-python3}
EPOCHS=${EPOCHS:-30}
RUN=${RUN:-/tmp/finetune-run}
DIR=${DIR:-models/cnn/resnet56}   # search_<method>.json (and baseline.pt unless BASELINE says)
BASELINE=${BASELINE:-$DIR/baseline.pt}
METHODS=${METHODS:-gnn mlp random uniform keepall}
MULTIPLE=${MULTIPLE:-8}            # channel counts are rounded to multiples of this
DISTILL=${DISTILL:-0}              # weight of distillation from the unpruned baseline
LR=${LR:-0.02}
CAP=${CAP:+--max-seconds $CAP}        # optional wall-clock cap per job (seconds)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
mkdir -p "$RUN" "$OUT"
any_policy=$(ls "$DIR"/search_*.json | head -n 1)   # the control keeps every group of the same model
$PY -c "import json; keep = json.load(open('$any_policy'))['best_keep']; \
print(json.dumps({'best_keep': {group: 1.0 for group in keep}}))" > "$RUN/search_keepall.json"
for method in $METHODS; do
  policy=$DIR/search_$method.json
  [ "$method" = keepall ] && policy=$RUN/search_keepall.json
  $PY -m compress.cli finetune --checkpoint "$BASELINE" --policy "$policy" --epochs "$EPOCHS" --lr "$LR" --distill "$DISTILL" $CAP --channel-multiple "$MULTIPLE" \
    --out "$RUN/finetuned_$method.pt" --data "$DATA" > "$RUN/finetune_$method.log" 2>&1 &
done
wait
tail -n 2 "$RUN"/finetune_*.log
cp "$RUN"/finetune_*.log "$RUN"/finetuned_*.pt "$OUT/" 2>/dev/null
