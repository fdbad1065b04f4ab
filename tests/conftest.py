"""Test setup: 8 emulated CPU devices, configured before any backend starts."""

import os

# Compilation dominates this suite's time on 2 cores. LLVM's expensive passes
# buy nothing for models this small and halve nothing but compile time; the
# reference and the sharded runs of every comparison compile under the same
# flags. Subprocesses started by tests inherit them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
# Start the backend now: a CLI called in-process (report, plan, describe with
# --devices N) must find the 8 devices fixed, not set its own count for every
# later test of this worker.
assert len(jax.devices()) == 8
