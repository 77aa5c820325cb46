#!/usr/bin/env bash
# Issue 15's measurements on the lent 16-core machine (no network there, at most 64 MiB carried per call,
# state kept only while the machine stays warm, 30 s, between calls). Prepare here (git-ignored folders):
#   .dev4/: whl/ (gguf, diskcache, psutil, tqdm, click, click-default-group, tabulate wheels),
#           llama_cpp_py/ (llama-cpp-python's Python files, lib/ with libllama.so.0, libggml.so.0 and
#           libggml-base.so.0 as the Makefile builds them: every CPU variant), bin/ (libggml-cpu-*.so),
#           old/pipeinfer_cpu (the tree to compare with), model.sha256
#   .dev5a/part .dev5b/part .dev5c/part: the default model re-quantised to pure Q4_0 (the bench pair's
#           source, `models bench-pair` writes it as source-pure-q4_0.gguf), `split -b 26M`
# Then, in a row, each call as soon as the one before returns:
#   run(carry=[".dev4"]):  scripts/device_netlab.sh setup && scripts/device_netlab.sh hop
#   run(carry=[".dev5a"]): scripts/device_netlab.sh part .dev5a
#   run(carry=[".dev5b"]): scripts/device_netlab.sh part .dev5b
#   run(carry=[".dev5c"]): scripts/device_netlab.sh part .dev5c && scripts/device_netlab.sh pair &&
#                          scripts/device_netlab.sh sweep goal
#   run():                 scripts/device_netlab.sh sweep grid
# And, for timings with each run's own cost (on random-weight models of the pair's shapes and types):
#   run(carry=[".dev4"]):  scripts/device_netlab.sh setup && scripts/device_netlab.sh calibrate
# Ranks are pinned to cores by Open MPI's --bind-to core; they share one memory bus, unlike a real cluster.
set -euo pipefail
ROOT=/root/pi
SITE=$ROOT/site
export PIPEINFER_CACHE=$ROOT/cache PYTHONUNBUFFERED=1 PIPEINFER_MPIEXEC=/usr/bin/mpiexec
export PIPEINFER_MPIEXEC_ARGS="--bind-to core"
export PYTHONPATH=$SITE:$PWD
source "$(dirname "$0")/device_site.sh"
PI="python3 -m pipeinfer_cpu"
case "$1" in
setup)
  mkdir -p $SITE $ROOT/parts
  install_site .dev4 $SITE
  cp .dev4/model.sha256 $ROOT/ && rm -rf $ROOT/old && cp -r .dev4/old $ROOT/old
  # a SYNTHETIC random-weight llama of SmolLM2-135M's shape with 120 layers, pure Q4_0: the bench target's cost
  python3 - <<PY
from dataclasses import replace
from pathlib import Path
from pipeinfer_cpu.modelfiles.tinymodel import VARIED, write_tiny_llama
from pipeinfer_cpu.llama.runtime import requantize_q4_0
f16 = Path("$ROOT/synthetic-f16.gguf")
write_tiny_llama(f16, replace(VARIED, n_vocab=49152, n_layer=120, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536))
requantize_q4_0(f16, Path("$ROOT/synthetic-120L-q4_0.gguf"), pure=True)
PY
  ;;
hop)  # before (old) and after (this tree), in one sitting, twice interleaved
  for label in old new old2 new2; do
    tree=$PWD; case $label in old*) tree=$ROOT/old;; esac
    (cd $tree && PYTHONPATH=$SITE:$tree python3 $OLDPWD/scripts/hop_cost.py --model $ROOT/synthetic-120L-q4_0.gguf \
       --rounds 2 --label $label --out $ROOT/hop/$label > /dev/null)
    cp $ROOT/hop/$label/hop.json $OUT/hop-$label.json
  done
  python3 -c "
import json
for l in ('old', 'new', 'old2', 'new2'):
    d = json.load(open('$OUT/hop-' + l + '.json')); d.pop('commands')
    print(l, {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()})"
  ;;
part)
  cp $2/part $ROOT/parts/$2
  ;;
pair)
  cat $ROOT/parts/.dev5a $ROOT/parts/.dev5b $ROOT/parts/.dev5c > $ROOT/source-pure-q4_0.gguf
  echo "$(cat $ROOT/model.sha256)  $ROOT/source-pure-q4_0.gguf" | sha256sum -c
  mkdir -p $ROOT/pair && cp $ROOT/source-pure-q4_0.gguf $ROOT/pair/
  $PI models bench-pair --agreement 0.6 -o $ROOT/pair 2>&1 | tail -4
  printf "localhost\nlocalhost\nlocalhost\nlocalhost\n" > $ROOT/hosts4.txt
  for model in target draft; do
    $PI hosts calibrate --hostfile $ROOT/hosts4.txt --model $ROOT/pair/synthetic-$model.gguf -t 1 \
      -o $ROOT/hosts4-$model.txt --timings $ROOT/$model.timings.json | tail -6
  done
  cp $ROOT/target.timings.json $ROOT/draft.timings.json $OUT/
  ;;
calibrate)  # timings with each run's own cost, of random-weight models of the pair's shapes and types
  printf "localhost\nlocalhost\nlocalhost\nlocalhost\n" > $ROOT/hosts4.txt
  python3 - <<PY
from dataclasses import replace
from pathlib import Path
from pipeinfer_cpu.modelfiles.tinymodel import VARIED, write_tiny_llama
from pipeinfer_cpu.llama.runtime import requantize_q4_0
f16 = Path("$ROOT/synthetic30-f16.gguf")
write_tiny_llama(f16, replace(VARIED, n_vocab=49152, n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536))
requantize_q4_0(f16, Path("$ROOT/synthetic-30L-q4_0.gguf"), pure=True)
PY
  for model in 120L 30L; do
    $PI hosts calibrate --hostfile $ROOT/hosts4.txt --model $ROOT/synthetic-$model-q4_0.gguf -t 1 \
      -o $ROOT/hosts4-$model.txt --timings $OUT/random-$model.timings.json | tail -5
  done
  ;;
sweep)  # $2: goal (100 Mbit/s + 2 ms, 3 repeats) or grid (3 x 3, 1 repeat)
  case $2 in
    goal) grid=(--bandwidth 100mbit --delay 2ms --repeats 3);;
    grid) grid=(--bandwidth 1gbit,100mbit,10mbit --delay 0.1ms,1ms,5ms --repeats 1);;
  esac
  $PI netlab sweep "${grid[@]}" --modes pipeline,speculative,pipeinfer --agreement 0.6 --pair-dir $ROOT/pair \
    --stages 4 --hostfile $ROOT/hosts4.txt -t 1 -n 32 --predict $ROOT/target.timings.json \
    --draft-calibration $ROOT/draft.timings.json --out $ROOT/sweep-$2 2>&1 | grep -v "%|" | tail -40
  mkdir -p $OUT/sweep-$2 && cp $ROOT/sweep-$2/sweep.json $ROOT/sweep-$2/sweep.md $ROOT/sweep-$2/*.png $OUT/sweep-$2/
  ;;
esac
