# k2train: two commands on a fresh machine.
#   make train   create .venv, install, train the tiny K2 model on the embedded default data
#   make test    install the test extras and run the suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/k2_tiny.yaml
# The tiny config lays out pp 2 x ep 2 x dp: 8 processes give dp 2.
NPROC  ?= 8

.PHONY: train test bench install install-test clean

# The stamp files depend on pyproject.toml, so a changed dependency list reinstalls.
$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "k2train needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

train: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m k2train train --config $(CONFIG)

test: install-test
	$(BIN)/pytest

# Throughput of the tiny config on this machine (not a test; numbers for comparisons).
bench: install
	$(BIN)/python tests/benchmarks/bench_tiny.py

clean:
	rm -rf $(VENV) runs wandb
