# Two commands do all set-up on a fresh machine:
#   make demo   create/refresh .venv, install, audit the bundled checkpoint
#   make test   create/refresh .venv, install, ruff check, mypy (strict on the core), pytest
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.deadneuron-installed

.PHONY: demo test venv lint typecheck bench bench-docs checkpoints clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e '.[dev,lightning,hf,tensorboard]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deadneuron audit checkpoints/slot_attention.pth

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/python -m mypy

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

checkpoints: $(STAMP)
	PYTHON=$(BIN)/python bash examples/make_checkpoints.sh

# One thread, then two; writes benchmarks/results/<date>-<machine>.json (peers left out if they do not install)
bench: $(STAMP)
	-$(BIN)/python -m pip install -qq --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/overhead.py --threads 1 2

# The README and docs/performance.md tables from the newest results file
bench-docs: $(STAMP)
	$(BIN)/python benchmarks/render_table.py --write

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
