# The two commands of the README. Each creates .venv and installs what it needs if missing.
#   make run    the main job: train the tiny GPT on the embedded corpus (jaxopt-llm train)
#   make test   the whole test suite (what CI runs, through .ci/run)
#   make test-min   the same suite on the oldest supported jax/optax/flax (constraints/minimum.txt)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-min parity clean

MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed-stamp

# --overwrite: each `make run` replaces the previous one's runs/train (a plain
# `jaxopt-llm train` refuses a folder holding an earlier run).
run: $(STAMP)
	$(VENV)/bin/jaxopt-llm train --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# The minimum versions pyproject.toml states, installed exactly, in a venv of their own.
test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

$(MIN_STAMP): pyproject.toml constraints/minimum.txt
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q -c constraints/minimum.txt -e '.[dev]'
	touch $(MIN_STAMP)

# PyTorch parity table of every optimizer (also part of `make test`).
parity: $(STAMP)
	$(PY) -m jaxopt_llm.parity

# torch is pinned to the CPU wheel (2.13.0) by pyproject's extras: never unpinned.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .hypothesis *.egg-info
