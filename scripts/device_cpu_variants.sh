#!/usr/bin/env bash
# On the lent 16-core machine (no network there): the llama.cpp build that `make` made on the 2-core
# AMD machine (every CPU backend variant, GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS), run at the variant
# its CPU gets and with haswell (AVX2 only) forced: equal outputs and speed, on a SYNTHETIC
# TinyLlama-1.1B-shaped model (random weights, Q4_0) generated there.
# Carry .dev6/: that llama_cpp_python wheel, and the gguf, diskcache, prompt_toolkit, wcwidth wheels.
#   run(carry=[".dev6"], command="bash scripts/device_cpu_variants.sh")
# With `native` and .dev7/ holding the llama-cpp-python sdist (slimmed: no .git, docs, models, GPU
# backends), a -march=native build of it made there is measured beside them:
#   run(carry=[".dev6", ".dev7"], command="bash scripts/device_cpu_variants.sh native")
set -euo pipefail
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .dev6/*.whl
export PYTHONPATH=$SITE:$PWD PIPEINFER_CACHE=/tmp/pc PYTHONUNBUFFERED=1
export PIPEINFER_MPIEXEC=/usr/bin/mpiexec PIPEINFER_MPIEXEC_ARGS="--bind-to none"
{ grep -m1 "model name" /proc/cpuinfo; grep -m1 flags /proc/cpuinfo | tr ' ' '\n' \
    | grep -E '^(avx2|avx512f|avx512vbmi|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|amx_int8)$' | tr '\n' ' '; echo;
  python3 -m pipeinfer_cpu cpu; PIPEINFER_CPU_VARIANT=haswell python3 -m pipeinfer_cpu cpu; } | tee $OUT/cpu.txt
CONFIGS=auto,haswell
if [ "${1:-}" = native ]; then
  mkdir -p /tmp/nb /tmp/native && tar xJf .dev7/*.tar.xz -C /tmp/nb
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/nb /tmp/nb/llama_cpp_python-*/
  python3 -m zipfile -e /tmp/nb/llama_cpp_python-*.whl /tmp/native
  CONFIGS=auto,haswell,native=/tmp/native/llama_cpp/lib
fi
mkdir -p /tmp/m
python3 - <<'PY'
from pathlib import Path
from pipeinfer_cpu.llama.runtime import requantize_q4_0
from pipeinfer_cpu.modelfiles.tinymodel import TinyShape, write_tiny_llama
shape = TinyShape(n_vocab=32000, n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632)
requantize_q4_0(write_tiny_llama(Path("/tmp/m/f16.gguf"), shape), Path("/tmp/m/tinyllama-shape-q4_0.gguf"))
PY
python3 scripts/cpu_variants.py --out /tmp/cv --model /tmp/m/tinyllama-shape-q4_0.gguf --configs $CONFIGS \
  --rounds 3 --threads 8 -n 64 --check
cp /tmp/cv/cpu-variants.json /tmp/cv/cpu-variants.md $OUT/
