# The whole set-up is two commands:
#   make quickstart   # creates .venv if missing, installs, runs the quickstart on the built-in tiny world
#   make test         # creates .venv if missing, installs with dev extras, runs the test suite
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

quickstart: $(VENV)/.installed
	$(BIN)/posttrain quickstart

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/sft_throughput.py
	$(BIN)/python benchmarks/dpo_throughput.py
	$(BIN)/python benchmarks/rl_throughput.py

clean-venv:
	rm -rf $(VENV)
