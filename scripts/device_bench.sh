#!/usr/bin/env bash
# Benchmark on the lent 16-core machine (no network there, at most 64 MiB carried per call, state kept
# only while the machine stays warm between calls). Prepare the carried folders here first:
#   .dev4/: whl/ (gguf, diskcache, psutil, tqdm wheels), llama_cpp_py/ (llama-cpp-python's Python
#           files), libs/ (libllama.so.0, libggml*.so.0 built on the 2-core machine: a build with the
#           device's own CMake segfaulted in tokenizer init), model.sha256, model.a (first bytes of
#           the pure-Q4_0 source model, `split`-style)
#   .dev5/: model.b (the rest of it)
# Then, one call each, in a row:
#   run(carry=[".dev4"]): scripts/device_bench.sh setup
#   run(carry=[".dev5"]): scripts/device_bench.sh model && scripts/device_bench.sh bench 0.2,0.4,0.6,0.8 sweep3
# The device's own mpi4py binds to its Open MPI, whose mpiexec pins ranks with --bind-to core.
set -euo pipefail
ROOT=/root/pi
SITE=$ROOT/site
export PYTHONPATH=$SITE:$PWD PIPEINFER_CACHE=$ROOT/cache PYTHONUNBUFFERED=1
case "$1" in
setup)
  mkdir -p $SITE
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .dev4/whl/*.whl
  rm -rf $SITE/llama_cpp && cp -r .dev4/llama_cpp_py $SITE/llama_cpp && mkdir -p $SITE/llama_cpp/lib
  cp .dev4/libs/* $SITE/llama_cpp/lib/
  (cd $SITE/llama_cpp/lib && for f in *.so.0; do ln -sf "$f" "${f%.0}"; done)
  cp .dev4/model.a .dev4/model.sha256 $ROOT/
  python3 -c "import llama_cpp, mpi4py.MPI as M, gguf; print('llama_cpp', llama_cpp.__version__, M.Get_library_version()[:40])"
  ;;
model)
  cat $ROOT/model.a .dev5/model.b > $ROOT/source.gguf
  echo "$(cat $ROOT/model.sha256)  $ROOT/source.gguf" | sha256sum -c
  ;;
bench)
  agreements=$2 out=$ROOT/$3
  mkdir -p $out/pairs && cp $ROOT/source.gguf $out/pairs/source-pure-q4_0.gguf
  printf "localhost\nlocalhost\nlocalhost\nlocalhost\n" > $ROOT/hosts.txt
  PIPEINFER_MPIEXEC=/usr/bin/mpiexec PIPEINFER_MPIEXEC_ARGS="--bind-to core" python3 -m pipeinfer_cpu bench \
    --hostfile $ROOT/hosts.txt --agreements "$agreements" --modes single,pipeline,speculative,pipeinfer \
    --stages 4 -t 1 -n 64 --out $out
  cp $out/bench.json $out/bench.md $OUT/ && cp $out/bench.png $OUT/ 2>/dev/null || true
  ;;
esac
