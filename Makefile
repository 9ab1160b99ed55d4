# `make demo` and `make test` work on a fresh clone: each creates .venv from pyproject.toml
# when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint bench sim docs clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Bytecode for the package itself: every CLI start imports it, even where
	# PYTHONDONTWRITEBYTECODE keeps Python from caching it.
	$(BIN)/python -m compileall -q orchestrator
	touch $@

demo: $(INSTALLED)
	$(BIN)/orchestrator demo

test: $(INSTALLED) lint
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check orchestrator tests bench docs
	$(BIN)/ruff format --check orchestrator tests bench docs
	$(BIN)/mypy

bench: $(INSTALLED)
	$(BIN)/python -m compileall -q orchestrator  # edited since install: cached, as installed
	$(BIN)/python -m bench

docs: $(INSTALLED)
	$(BIN)/python docs/gen_cli.py

sim: $(INSTALLED)
	$(BIN)/orchestrator sim --port 8080

clean:
	rm -rf $(VENV) .orchestrator bench-results .pytest_cache .mypy_cache .ruff_cache
