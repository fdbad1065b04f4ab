"""Ring, all-gather, Ulysses, the Ulysses x ring hybrid and dense attention: memory, bytes, step time.

    python bench/ring_attention.py [--seq 8] [--lengths 512,1024,2048,4096,8192] [--hybrid-degree 4]
                                   [--time 5] [--json out.json]
    python bench/ring_attention.py --gpu-overhead [--lengths 1024,4096,8192] [--json out.json]

Default mode: on --seq emulated CPU devices (a mesh of seq alone), one
attention layer's gradient step (forward + backward of a weighted sum of the
output) is compiled, not run, for each sequence length and implementation;
the table gives the compiled memory analysis per device (arguments, outputs,
temporaries and their sum) and the bytes each device sends (collectives in
the compiled HLO, loop trip counts applied). ``dense`` is
``shardlib.parallel.dense_attention.gqa_attention`` (causal) left to XLA's partitioner with the same
seq-sharded inputs. ``ulysses`` is ``attention.impl: ulysses`` over the whole
seq axis (kv heads repeated to the degree where fewer), ``hybrid`` the same
with ``ulysses_degree = --hybrid-degree`` (all-to-alls within groups of that
many devices, the ring across the groups). ``--time N``: the compiled steps
also run, N rounds alternating between the implementations (so a load that
comes and goes hits them alike), and the table adds each one's median step
time in ms: on emulated CPU devices that is the host's compute and copies,
not a network's (the relative cost of the kernels, not of their links).

--gpu-overhead: on one accelerator, the ring kernel over a one-device mesh
(seq = 1: no sends, the same tiles, scan and conds) against
``jax.nn.dot_product_attention`` (causal) at the same length, forward +
backward, median of --repeats after a warm-up. It measures what the ring's
blockwise formulation costs where there is nothing to overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (attention.impl, make_attention settings); "hybrid"'s degree is --hybrid-degree.
IMPLS = {
    "ring": ("ring", {}),
    "allgather": ("allgather", {}),
    "ulysses": ("ulysses", {}),
    "hybrid": ("ulysses", {"ulysses_degree": None}),
    "dense": ("dense", {}),
}


def _shape(args, length):
    return (args.batch, length, args.heads, args.head_dim), (args.batch, length, args.kv_heads, args.head_dim)


def _attention_fn(name, mesh, length, block_k, hybrid_degree):
    """f(q, k, v, positions) on global arrays, for the implementation ``name`` over ``mesh``'s seq axis."""
    from shardlib.core.rules import preset_rules
    from shardlib.core.sharding import ActivationSharding
    from shardlib.parallel.attention import make_attention
    from shardlib.parallel.dense_attention import gqa_attention

    impl, settings = IMPLS[name]
    if impl == "dense":
        return lambda q, k, v, pos: gqa_attention(q, k, v, is_causal=True, query_positions=pos, key_positions=pos)
    settings = {key: hybrid_degree for key in settings}  # the hybrid's degree
    shard = ActivationSharding(preset_rules("dp"), mesh)
    plan = make_attention(impl, "zigzag", shard, length, block_k, **settings)
    return lambda q, k, v, pos: plan.fn(q, k, v, pos, pos)


def memory_table(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from shardlib.analysis.hlo import collectives, summarize
    from shardlib.core.mesh import build_mesh, mesh_spec

    mesh = build_mesh(mesh_spec(seq=args.seq), jax.devices("cpu")[: args.seq])
    seq_sharded = NamedSharding(mesh, P(None, "seq"))
    rows = []
    print(
        f"one attention layer, fwd+bwd, per device, seq={args.seq}: B={args.batch} H={args.heads} "
        f"N={args.kv_heads} K={args.head_dim} {args.dtype}, ring block_k={args.block_k}"
    )
    header = f"{'S':>6} {'impl':<10}{'args MiB':>10}{'out MiB':>9}{'temp MiB':>10}{'peak MiB':>10}{'sent MiB':>10}"
    print(header + f"{'compile s':>10}" + (f"{'step ms':>10}" if args.time else ""))
    dtype = jnp.dtype(args.dtype)
    for length in (int(x) for x in args.lengths.split(",")):
        q_shape, kv_shape = _shape(args, length)
        abstract = [jax.ShapeDtypeStruct(s, dtype, sharding=seq_sharded) for s in (q_shape, kv_shape, kv_shape)]
        pos = jax.ShapeDtypeStruct((args.batch, length), jnp.int32, sharding=seq_sharded)
        steps = {}
        for impl in IMPLS:
            attend = _attention_fn(impl, mesh, length, args.block_k, args.hybrid_degree)

            def loss(q, k, v, pos, attend=attend):
                return jnp.sum(attend(q, k, v, pos).astype(jnp.float32))

            started = time.perf_counter()
            with jax.set_mesh(mesh):
                compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*abstract, pos).compile()
            seconds = time.perf_counter() - started
            mem = compiled.memory_analysis()
            sent = sum(c.wire_bytes * c.executions for c in collectives(compiled.as_text()))
            row = {
                "seq_len": length,
                "impl": impl,
                "argument_bytes": mem.argument_size_in_bytes,
                "output_bytes": mem.output_size_in_bytes,
                "temp_bytes": mem.temp_size_in_bytes,
                "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes,
                "sent_bytes": sent,
                "collectives": summarize(collectives(compiled.as_text())),
                "compile_s": round(seconds, 2),
            }
            rows.append(row)
            steps[impl] = compiled
        if args.time:
            timed = _step_times(steps, abstract, pos, args.time)
            for row in rows[-len(IMPLS) :]:
                row["step_ms"] = timed[row["impl"]]
        mib = 1 / 2**20
        for row in rows[-len(IMPLS) :]:
            print(
                f"{length:>6} {row['impl']:<10}{row['argument_bytes'] * mib:>10.2f}{row['output_bytes'] * mib:>9.2f}"
                f"{row['temp_bytes'] * mib:>10.2f}{row['peak_bytes'] * mib:>10.2f}{row['sent_bytes'] * mib:>10.2f}"
                f"{row['compile_s']:>10.1f}" + (f"{row['step_ms']:>10.1f}" if args.time else ""),
                flush=True,
            )
    kv = 2 * args.batch * args.kv_heads * args.head_dim * dtype.itemsize
    print(f"ring forward lower bound: (p-1)/p of K and V = {(args.seq - 1) / args.seq:.3f} x S x {kv} bytes per device")
    return rows


def _step_times(steps, abstract, pos, rounds) -> dict[str, float]:
    """Median ms of each compiled step over ``rounds`` rounds, the implementations alternating."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.key(0), len(abstract))
    inputs = [jax.device_put(jax.random.normal(key, a.shape, a.dtype), a.sharding) for key, a in zip(keys, abstract)]
    positions = jax.device_put(jnp.broadcast_to(jnp.arange(pos.shape[1], dtype=jnp.int32), pos.shape), pos.sharding)
    for compiled in steps.values():  # warm-up
        jax.block_until_ready(compiled(*inputs, positions))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, compiled in steps.items():
            started = time.perf_counter()
            jax.block_until_ready(compiled(*inputs, positions))
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def gpu_overhead(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from shardlib.parallel.ring_attention import ring_attention

    device = jax.devices()[0]
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,), devices=[device])
    ring = jax.shard_map(
        lambda q, k, v: ring_attention(q, k, v, axis_name="seq", axis_size=1, block_k=args.block_k),
        mesh=mesh,
        in_specs=P(),
        out_specs=P(),
        check_vma=False,
    )

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    dtype = jnp.dtype(args.dtype)
    rows = []
    print(
        f"{device.device_kind}: fwd+bwd ms, B={args.batch} H={args.heads} N={args.kv_heads} K={args.head_dim} {dtype}"
    )
    print(f"{'S':>6}{'ring ms':>10}{'dense ms':>10}{'ratio':>8}{'max |dgrad|':>12}")
    for length in (int(x) for x in args.lengths.split(",")):
        q_shape, kv_shape = _shape(args, length)
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, s, dtype) for key, s in zip(keys, (q_shape, kv_shape, kv_shape)))
        result = {"seq_len": length}
        outs = {}
        for name, fn in (("ring", ring), ("dense", dense)):
            step = jax.jit(
                jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
            )
            outs[name] = jax.block_until_ready(step(q, k, v))  # warm-up (compiles)
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times.append(time.perf_counter() - started)
            result[f"{name}_ms"] = statistics.median(times) * 1e3
        result["ratio"] = result["ring_ms"] / result["dense_ms"]
        # Gradients of the same loss, ring against dense (in the compute dtype's precision).
        result["max_abs_grad_diff"] = max(
            float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
            for a, b in zip(outs["ring"][1], outs["dense"][1], strict=True)
        )
        rows.append(result)
        print(
            f"{length:>6}{result['ring_ms']:>10.3f}{result['dense_ms']:>10.3f}{result['ratio']:>8.2f}"
            f"{result['max_abs_grad_diff']:>12.2e}"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-overhead", action="store_true", help="time ring (1 device) vs dense on one accelerator")
    parser.add_argument("--seq", type=int, default=8, help="emulated CPU devices on the seq axis (memory mode)")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32 (memory mode default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--block-k", type=int, default=256, help="ring attention keys per inner block")
    parser.add_argument("--hybrid-degree", type=int, default=4, help="the hybrid's Ulysses degree (divides --seq)")
    parser.add_argument("--time", type=int, default=0, help="also run each step this many rounds, alternating")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)

    import jax

    if args.gpu_overhead:
        args.lengths = args.lengths or "1024,4096,8192"
        args.dtype = args.dtype or "bfloat16"
        rows = gpu_overhead(args)
    else:
        # Compile-only: LLVM's expensive passes change no buffer sizes and dominate on small CPUs.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_llvm_disable_expensive_passes=true"
        ).strip()
        jax.config.update("jax_num_cpu_devices", args.seq)
        args.lengths = args.lengths or "512,1024,2048,4096,8192"
        args.dtype = args.dtype or "float32"
        rows = memory_table(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
