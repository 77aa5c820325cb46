#!/usr/bin/env bash
# Benchmark on the lent 16-core machine (no network there): build llama.cpp on it with its own
# CMake, install the carried wheels, rebuild the pure-Q4_0 source model from carried pieces, then
# run the agreement sweep with 4 target stages + 1 draft rank, each pinned to its own core.
#
#   phase setup  (carries .dev/:  llama.cpp sources, llama_cpp python files, wheels, model part 1)
#   phase model  (carries .dev2/: the rest of the model)
#   phase bench AGREEMENTS OUTDIR  (runs `pipeinfer-cpu bench` and copies the reports to $OUT)
set -euo pipefail
ROOT=/root/pi
SITE=$ROOT/site
export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH PIPEINFER_CACHE=$ROOT/cache PYTHONUNBUFFERED=1
case "$1" in
setup)
  mkdir -p $ROOT/ll $SITE
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .dev/whl/*.whl
  tar xzf .dev/llsrc.tgz -C $ROOT/ll
  cmake -S $ROOT/ll -B $ROOT/ll/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > $ROOT/cmake.log
  cmake --build $ROOT/ll/build -j 16 > $ROOT/build.log
  cp -r .dev/llama_cpp_py $SITE/llama_cpp && mkdir -p $SITE/llama_cpp/lib
  cp -P $ROOT/ll/build/bin/*.so* $SITE/llama_cpp/lib/
  cp .dev/modelpart.00 .dev/model.sha256 $ROOT/
  python3 -c "import llama_cpp, mpi4py.MPI as M, gguf; print('llama_cpp', llama_cpp.__version__, M.Get_library_version()[:40])"
  which mpiexec; lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(s\)"
  ;;
model)
  cat $ROOT/modelpart.00 .dev2/modelpart.rest > $ROOT/source.gguf
  echo "$(cat $ROOT/model.sha256)  $ROOT/source.gguf" | sha256sum -c
  ;;
bench)
  agreements=$2 out=$ROOT/$3
  mkdir -p $out/pairs && cp -n $ROOT/source.gguf $out/pairs/source-pure-q4_0.gguf
  printf "localhost\nlocalhost\nlocalhost\nlocalhost\n" > $ROOT/hosts.txt
  # The device image has Open MPI (its mpi4py binds to it): use its mpiexec, which pins with --bind-to core.
  PIPEINFER_MPIEXEC=/usr/bin/mpiexec PIPEINFER_MPIEXEC_ARGS="--bind-to core" python3 -m pipeinfer_cpu bench --hostfile $ROOT/hosts.txt \
    --agreements "$agreements" --modes single,pipeline,speculative,pipeinfer --stages 4 -t 1 -n 64 --out $out
  cp $out/bench.json $out/bench.md $OUT/ && cp $out/bench.png $OUT/ 2>/dev/null || true
  ;;
esac
