"""The two ceilings of the device JAX runs on, measured: a bf16 matrix product's rate and a copy's bandwidth.

    python bench/ceilings.py [--json out.json]

Datasheet peaks are leads; MFU against them says how far from the chip's
rate a step is, and these say how far from what XLA's own kernels reach
on this very device: an 8192^3 bf16 matmul (random data: zeros run faster)
and a device-to-device copy of 2 GiB, counting bytes read plus written.
Each is the median of 10 timed runs after 3 untimed ones. On a CPU it runs
at a smaller size (2048^3, 256 MiB) and means little.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time


def _median_seconds(fn, *args, repeats: int = 10) -> float:
    import jax

    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings() -> dict:
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    n, copy_bytes = (8192, 2**31) if device.platform == "gpu" else (2048, 2**28)
    a_key, b_key = jax.random.split(jax.random.key(0))
    a_NxN = jax.random.normal(a_key, (n, n), jnp.bfloat16)
    b_NxN = jax.random.normal(b_key, (n, n), jnp.bfloat16)
    matmul_s = _median_seconds(jax.jit(jnp.matmul), a_NxN, b_NxN)
    x = jax.random.normal(a_key, (copy_bytes // 4,), jnp.float32)
    copy_s = _median_seconds(jax.jit(lambda v: v * 1.0001), x)  # read once, write once: one pass, not foldable
    return {
        "device": device.device_kind,
        "jax": jax.__version__,
        "matmul_n": n,
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "copy_bytes": 2 * copy_bytes,
        "copy_tb_per_s": 2 * copy_bytes / copy_s / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    r = ceilings()
    print(
        f"{r['device']}, jax {r['jax']}: bf16 matmul {r['matmul_n']}^3 {r['matmul_tflops']:.3g} TFLOP/s, "
        f"copy {r['copy_tb_per_s']:.3g} TB/s (read + written)"
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
