# The two commands: `make train` and `make test` (`make test-quick` leaves out the slow tests).
# Beside them, what CI (.ci/run) adds: `make docs` (the site, strict) and `make wheel-check` (the package as installed).
# Each creates the virtual environment (.venv) and installs the project into it when missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
# Extra train.py arguments, e.g. make train ARGS="steps=50 run_dir=runs/try1"
ARGS ?=

.PHONY: train test test-quick describe docs wheel-check lint typecheck clean-venv gpu-wheels

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

# The docs site into site/ (mkdocs.yml), strict: a broken link, anchor or API reference fails.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $(DOCS_STAMP)

# ruff's lint rules and its formatter, over everything tracked (pyproject.toml: [tool.ruff]).
lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

# mypy over the package (pyproject.toml: [tool.mypy]): strict on the public entry points, the rest staged.
typecheck: $(STAMP)
	$(BIN)/python -m mypy

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# The sdist and wheel built, the wheel installed into a fresh virtual environment, examples/ run from it.
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh $(BIN)/python

describe: $(STAMP)
	$(BIN)/python -m shardlib.analysis.describe --config configs/tiny.yaml --mesh meshes/cpu-8.yaml

# The wheels the GPU machine's image lacks (it has JAX, Flax, Optax, Orbax, chex...; not pydantic
# or tensorboardX), for its Python 3.12 on x86-64, into .whl/ (ignored): name .whl in the device
# tool's carry, and bench/gpu_env.sh installs them there.
GPU_WHEELS := pydantic pydantic_core annotated_types typing_inspection typing_extensions tensorboardx
gpu-wheels: $(STAMP)
	rm -rf .whl /tmp/shardlib-wheels
	$(BIN)/python -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --dest /tmp/shardlib-wheels "pydantic>=2.6" "tensorboardX>=2.6"
	mkdir -p .whl && for w in $(GPU_WHEELS); do cp /tmp/shardlib-wheels/$$w-*.whl .whl/; done
	ls .whl

clean-venv:
	rm -rf $(VENV)
