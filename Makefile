# jaxaccel — `make demo` and `make test` each work alone from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup simde demo test test-slow bench clean

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
test: setup simde
	$(PY) -m pytest -q -n auto --dist loadfile

# SIMDe's headers (Debian/Ubuntu libsimde-dev) let the tests run the kernels' AVX-512 code on a CPU
# without AVX-512 (emulated) and compare it with the AVX2 code. Installed where apt-get can (root);
# elsewhere those two tests skip and say why. Nothing else needs them.
SIMDE_HEADER := /usr/include/simde/x86/avx512.h
simde:
	@test -f $(SIMDE_HEADER) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q libsimde-dev >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1; }; }; } \
	  || echo "note: libsimde-dev is not installed: the emulated AVX-512 kernel tests will skip"

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	bash scripts/bench.sh

clean:
	rm -rf runs .pytest_cache .hypothesis
