# Two commands do everything on a fresh machine: `make train` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision first, as an exact pair: the registry's torchvision is a CUDA build that only
# imports against this exact torch (triple '=' matches the version string exactly).
TORCH_PINS := "torch===2.13.0" "torchvision===0.28.0"
STAMP := $(VENV)/.installed

.PHONY: help install train test test-full lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install sgma with dev tools (quick when nothing changed)

train: install  ## train on the built-in synthetic data, then print the all-pattern evaluation table
	$(PY) train.py $(ARGS)

test: install  ## the default test suite (skips tests marked slow), one worker per core; .ci/run calls this
	$(PY) -m pytest -m "not slow" -n auto -q $(ARGS)

test-full: install  ## every test, slow ones included, one worker per core
	$(PY) -m pytest -n auto -q $(ARGS)

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check src tests scripts train.py eval.py predict.py
	$(VENV)/bin/ruff format --check src tests scripts train.py eval.py predict.py

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests scripts train.py eval.py predict.py
	$(VENV)/bin/ruff format src tests scripts train.py eval.py predict.py

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf logs outputs multirun wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
