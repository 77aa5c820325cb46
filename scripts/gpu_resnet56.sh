#!/usr/bin/env bash
# ResNet-56 @ 50% FLOPs from a longer-trained baseline, in three GPU calls of under 10 minutes:
#   PHASE=train  EPOCHS=70  -> $RUN/baseline.pt
#   PHASE=search EPISODES=80 [MULTIPLE=8] [BASELINE=$RUN/baseline.pt] [METHODS="gnn mlp random uniform"]
#                [LATENCY=table.json SPEEDUP=1.7]  (also bound the predicted latency on the table's CPU)
#                -> $RUN/search_<method>.json (the searches at once; each records its channel multiple)
#   then DIR=$RUN BASELINE=<the same baseline> EPOCHS=30 [DISTILL=0.5] bash scripts/gpu_finetune.sh
#   (fine-tuning of every policy + an unpruned control)
# Usage (repo root, CIFAR-10 zips in $DATA): PHASE=... OUT=/some/dir DATA=.data/cifar10 bash scripts/gpu_resnet56.sh
set -u -o pipefail
PY=${PY:-python3}
RUN=${RUN:-/tmp/resnet56-run}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
mkdir -p "$RUN" "$OUT"
case "$PHASE" in
train)
  $PY -m compress.cli train --arch resnet56 --epochs "${EPOCHS:-70}" --seed 0 --out "$RUN/baseline.pt" \
    --data "$DATA" 2>&1 | tail -n 3 | tee "$RUN/train.log"
  cp "$RUN/baseline.pt" "$RUN/train.log" "$OUT/"
  ;;
search)
  bound=()
  [ -n "${LATENCY:-}" ] && bound+=(--latency-table "$LATENCY" --min-speedup "$SPEEDUP")
  for method in ${METHODS:-gnn mlp random uniform}; do
    $PY -m compress.cli search --checkpoint "${BASELINE:-$RUN/baseline.pt}" --target 0.5 --method "$method" \
      --episodes "${EPISODES:-80}" --channel-multiple "${MULTIPLE:-8}" --seed 0 "${bound[@]}" --out-dir "$RUN" --data "$DATA" > "$RUN/search_$method.log" 2>&1 &
  done
  wait
  tail -n 2 "$RUN"/search_*.log
  cp "$RUN"/search_*.json "$RUN"/search_*.log "$OUT/"
  ;;
esac
