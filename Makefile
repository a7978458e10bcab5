# jaxaccel — `make demo` and `make test` each work alone from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m jaxaccel train --config experiments/mnist5k_cnn3.py --workdir runs/demo

# One pytest worker per core, each test file on one worker (module fixtures stay shared):
# most tests wait on single-threaded XLA compiles or on subprocesses, so two workers on two
# cores roughly halve the wall time.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	bash scripts/bench.sh

clean:
	rm -rf runs .pytest_cache .hypothesis
