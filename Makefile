# Two commands on a fresh machine: `make demo` (generate text on this machine) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Inference only: builds llama.cpp from source through llama-cpp-python (about 3-4 minutes on 2 cores).
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Tests and the compress extra. torch is pinned first so pip takes the CPU build, not a CUDA one.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,compress]'
	touch $@

demo: $(VENV)/.installed-run
	$(BIN)/pipeinfer-cpu run --hostfile hosts/local.txt --chat-template -n 96 -p "$(PROMPT)"

test: $(VENV)/.installed-test
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-run
	$(BIN)/pipeinfer-cpu bench --hostfile hosts/local.txt --out bench-results

clean:
	rm -rf $(VENV)
