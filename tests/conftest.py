"""Test setup: 8 emulated CPU devices, configured before any backend starts."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
