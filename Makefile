# Two commands set everything up on a fresh machine with only python3:
#   make demo   create .venv if missing, install, run `precond demo`
#   make test   same environment; ruff, mypy on the package, pytest
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint typecheck pytest test-fast test-slow bench bench-dense clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints-dev.txt
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt -e ".[data,bench,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/precond demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

# Without the slow marker (Monte-Carlo convergence, long training runs).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The committed CPU results of issue 6's grid (benchmarks/results/cpu, ~20 min on 2 idle
# cores) and of the dense-curvature methods on a small MLP (benchmarks/results/cpu-dense,
# ~7 min). Run them on an otherwise idle machine.
bench: $(STAMP)
	$(BIN)/precond bench --grid cpu

bench-dense: $(STAMP)
	$(BIN)/precond bench --grid cpu-dense

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
