# Two commands on a fresh machine with Python >= 3.10 and pip:
#   make demo   sets up .venv and runs the main job (examples/finetune_minilm.py)
#   make test   sets up .venv and runs the linter and the test suite
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is developed on.
# Elsewhere, install the torch build for your hardware into .venv first, or pass TORCH_SPEC=torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,demo]"
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) examples/finetune_minilm.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples benchmarks data
	$(VENV)/bin/ruff format --check src tests examples benchmarks data

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
