"""Test setup: 8 emulated CPU devices, configured before any backend starts."""

import importlib.metadata
import os
import pathlib
import tempfile

# Compilation dominates this suite's time on 2 cores. LLVM's expensive passes
# buy nothing for models this small and halve nothing but compile time; the
# reference and the sharded runs of every comparison compile under the same
# flags. Subprocesses started by tests inherit them.
#
# XLA:CPU's MLIR fusion emitters cost more to compile than the elemental emitters they
# replace: measured on tests/test_equivalence.py + tests/test_parallel_plan.py (21 tests, one
# process, jax 0.10.2), 116 CPU-s with them and 64 CPU-s without; one pipeline train step
# compiles in 2.9 s instead of 5.9 s. What the HLO computes is the same either way.
#
# XLA:CPU splits each module's LLVM code generation into parts compiled on parallel threads. With
# two test workers on two cores no thread is free, and the split only adds work: measured on
# tests/test_compat.py + tests/test_pipeline_stages.py as `make test` runs them (two workers, two
# cores, jax 0.10.2, runs alternating with and without, two of each), wall 177 -> 149 s and CPU
# 338 -> 283 s (0.84 both). It changes the machine code, so the rounding, not what is computed.
#
# XLA aborts on a flag it does not know, so these are set only for the jaxlib they were measured on.
_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
if importlib.metadata.version("jaxlib").startswith("0.10."):
    _FLAGS += ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"]
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()

# JAX's persistent compilation cache is opt-in: SHARDLIB_TEST_COMPILE_CACHE=1 keeps compiled
# executables in .jax-cache/ of the checkout (gitignored), inherited by subprocesses. Measured
# on test_cli + test_multiprocess (2 workers, busy 2-core machine): CPU 200 s without it, 246 s
# with an empty cache (every compile is also serialised and written; CI starts from a fresh
# clone, so that is its case), 201 s with a full one: nothing is compiled twice often enough to
# pay. The kill trials keep their own cache per module (tests/procs.py: env).
if os.environ.get("SHARDLIB_TEST_COMPILE_CACHE") == "1":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tokenized-corpus cache (shardlib/training/token_cache.py) of every test run, and of the
# training subprocesses tests start, lives in a fresh temporary directory, not the user's ~/.cache.
os.environ.setdefault("SHARDLIB_CACHE_DIR", tempfile.mkdtemp(prefix="shardlib-test-cache-"))
# Results one test process computes that another may reuse (tests/support.py: shared_result), in a
# directory the xdist workers inherit from the process that starts them: one per `pytest` run.
os.environ.setdefault("SHARDLIB_TEST_SHARED_DIR", tempfile.mkdtemp(prefix="shardlib-test-shared-"))

import jax  # reads the JAX_* variables above

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
# Start the backend now: a CLI called in-process (report, plan, describe with
# --devices N) must find the 8 devices fixed, not set its own count for every
# later test of this worker.
assert len(jax.devices()) == 8


def pytest_collection_modifyitems(session, config, items):
    """The modules with slow tests (the process launches, the kill trials) or a long module setup
    (``RUN_FIRST = True``) run first, each kept whole (its module fixtures are set up once): the two
    workers start on the longest work and finish on the short tests together, instead of one
    waiting for a long test that started last."""
    slow_modules = {
        item.module.__name__
        for item in items
        if item.get_closest_marker("slow") or getattr(item.module, "RUN_FIRST", False)
    }
    order = {item: index for index, item in enumerate(items)}
    items.sort(key=lambda item: (item.module.__name__ not in slow_modules, order[item]))
