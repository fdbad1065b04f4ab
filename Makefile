# The two commands: `make train` and `make test`. Each creates the virtual
# environment (.venv) and installs the project into it when missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra train.py arguments, e.g. make train ARGS="steps=50 run_dir=runs/try1"
ARGS ?=

.PHONY: train test describe clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py --config configs/tiny.yaml --mesh meshes/cpu-8.yaml $(ARGS)

# Two workers: compilation dominates, and XLA compiles on one core.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 $(ARGS)

describe: $(STAMP)
	$(BIN)/python -m shardlib.describe --config configs/tiny.yaml --mesh meshes/cpu-8.yaml

clean-venv:
	rm -rf $(VENV)
