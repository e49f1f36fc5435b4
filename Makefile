# Two commands for a new user: `make demo` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 first, as its own step: here pip finds the CPU wheel on disk; asking for a
# range instead would pull the newest CUDA build (several GB). pyproject admits 2.13-2.14.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/.fedtune-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.fedtune-installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/fedtune simulate

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
