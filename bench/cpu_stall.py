"""XLA:CPU's stall under DiLoCo, reduced to two jitted programs: exits 0, or hangs in an all-reduce.

    python bench/cpu_stall.py [--steps-in-flight loop|none|N] [--steps 160] [--every 8] [--width 512]

DiLoCo's pattern on 8 emulated CPU devices (data 4 x model 2): an inner step under
``vmap`` over the replicas (no collective), dispatched ``--steps`` times, and every
``--every`` steps an outer step whose mean over the replicas is an all-reduce over
``data``; the host never fetches anything until the end. ``--steps-in-flight`` is
how far the host may run ahead of the devices: ``loop`` (the training loop's
``loop.steps_in_flight``, 2 on XLA:CPU), ``none`` (no bound), or a number.

Without a bound the host queues every step at once; XLA:CPU's launches of the
later programs then block the client pool's threads (each device's in-flight
limit), the outer all-reduce cannot gather its last devices, and it hangs
("This thread has been waiting for `all reduce ...` for 20 seconds and may be
stuck"; XLA aborts the process after 40 s). With the loop's bound it finishes in
seconds. ``tests/test_diloco_cpu_stall.py`` runs it both ways.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-in-flight", default="loop", help="loop, none or a number of steps")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=2, help="H: inner steps per outer step")
    parser.add_argument("--width", type=int, default=512, help="D of the [D, D] weights (the inner step's cost)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_num_cpu_devices", 8)
    from shardlib.training.loop import DispatchWindow, steps_in_flight

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    bound = {"loop": steps_in_flight(mesh), "none": None}.get(args.steps_in_flight)
    bound = int(args.steps_in_flight) if args.steps_in_flight not in ("loop", "none") else bound
    per_replica = NamedSharding(mesh, P("data", None, "model"))
    anchor_sharding = NamedSharding(mesh, P(None, "model"))

    def inner(w_RxDxD, x_RxNxD):
        def one(w_DxD, x_NxD):
            return w_DxD - 1e-3 * x_NxD.T @ jnp.tanh(x_NxD @ w_DxD)

        w_RxDxD = jax.vmap(one, spmd_axis_name="data")(w_RxDxD, x_RxNxD)
        return w_RxDxD, jnp.sum(w_RxDxD, axis=(1, 2))  # and a per-replica "metric", as the inner step's

    def outer(w_RxDxD, anchor_DxD):
        anchor_DxD = anchor_DxD - 0.7 * jnp.mean(anchor_DxD[None] - w_RxDxD, axis=0)  # the all-reduce over data
        return jnp.broadcast_to(anchor_DxD, w_RxDxD.shape), anchor_DxD

    metric_sharding = NamedSharding(mesh, P("data"))
    inner_step = jax.jit(inner, out_shardings=(per_replica, metric_sharding), donate_argnums=0)
    outer_step = jax.jit(outer, out_shardings=(per_replica, anchor_sharding), donate_argnums=(0, 1))
    d = args.width
    w = jax.device_put(jnp.full((4, d, d), 0.01), per_replica)
    anchor = jax.device_put(jnp.full((d, d), 0.01), anchor_sharding)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (4, 64, d)), NamedSharding(mesh, P("data")))
    window = DispatchWindow(bound)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        window.admit()
        w, metric_R = inner_step(w, x)
        window.dispatched(metric_R)  # not w: it is donated to the next step
        if step % args.every == 0:
            w, anchor = outer_step(w, anchor)
    total = float(jnp.sum(anchor))
    print(f"{args.steps} steps, H = {args.every}, steps in flight {bound}: done in "
          f"{time.perf_counter() - started:.1f} s (sum {total:.4f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
