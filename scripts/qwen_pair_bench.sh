#!/usr/bin/env bash
# The Qwen2.5-Coder pair on this machine, one sitting: pipeinfer-cpu's four modes and llama.cpp's own
# programs on the same prompts (code and chat sets, 64 tokens each, greedy).
#   scripts/qwen_pair_bench.sh LLAMA_CPP_BIN_DIR [OUT_DIR]
set -euo pipefail
BIN=$1
OUT=${2:-bench-results/local-2core/qwen-pair}
T=qwen2.5-coder-1.5b
D=qwen2.5-coder-0.5b
TFILE=$(python -c "from pipeinfer_cpu.modelfiles.registry import resolve_model; print(resolve_model('$T'))")
DFILE=$(python -c "from pipeinfer_cpu.modelfiles.registry import resolve_model; print(resolve_model('$D'))")
for set in code chat; do
  P=scripts/prompts/qwen-$set.txt
  pipeinfer-cpu bench --model $T --modes single -t 2 -n 64 --prompts-file $P --out $OUT/$set-single2
  pipeinfer-cpu bench --model $T --modes single,pipeline --stages 2 -t 1 -n 64 --prompts-file $P --out $OUT/$set-pipeline
  pipeinfer-cpu bench --model $T --draft $D --modes speculative,pipeinfer --stages 1 -t 1 -n 64 --draft-max 2 \
    --prompts-file $P --out $OUT/$set-spec
  python scripts/llamacpp_baseline.py --bin "$BIN" --model "$TFILE" --draft "$DFILE" --prompts-file $P -n 64 -t 2 \
    --draft-max 2 --out $OUT/$set-llamacpp
done
