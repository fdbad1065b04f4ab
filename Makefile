# The two commands: `make train` and `make test` (`make test-quick` leaves out the slow tests).
# Each creates the virtual environment (.venv) and installs the project into it when missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra train.py arguments, e.g. make train ARGS="steps=50 run_dir=runs/try1"
ARGS ?=

.PHONY: train test test-quick describe clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py --config configs/tiny.yaml --mesh meshes/cpu-8.yaml $(ARGS)

# Two workers: compilation dominates, and XLA compiles on one core. The whole suite, slow
# tests included (what CI runs). SHARDLIB_TEST_COMPILE_CACHE=1 caches executables in .jax-cache/.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 $(ARGS)

# Without the slow tests (most of the SIGKILL trials).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 -m 'not slow' $(ARGS)

describe: $(STAMP)
	$(BIN)/python -m shardlib.analysis.describe --config configs/tiny.yaml --mesh meshes/cpu-8.yaml

clean-venv:
	rm -rf $(VENV)
