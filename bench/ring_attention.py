"""Ring, all-gather and dense attention: peak memory per device, bytes sent, GPU overhead.

    python bench/ring_attention.py [--seq 8] [--lengths 512,1024,2048,4096,8192] [--json out.json]
    python bench/ring_attention.py --gpu-overhead [--lengths 1024,4096,8192] [--json out.json]

Default mode: on --seq emulated CPU devices (a mesh of seq alone), one
attention layer's gradient step (forward + backward of a weighted sum of the
output) is compiled, not run, for each sequence length and implementation;
the table gives the compiled memory analysis per device (arguments, outputs,
temporaries and their sum) and the bytes each device sends (collectives in
the compiled HLO, loop trip counts applied). ``dense`` is
``shardlib.parallel.dense_attention.gqa_attention`` (causal) left to XLA's partitioner with the same
seq-sharded inputs.

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

IMPLS = ("ring", "allgather", "dense")


def _shape(args, length):
    return (args.batch, length, args.heads, args.head_dim), (args.batch, length, args.kv_heads, args.head_dim)


def _attention_fn(impl, mesh, length, block_k):
    """f(q, k, v, positions) on global arrays, for ``impl`` over ``mesh``'s seq axis."""
    from shardlib.core.rules import preset_rules
    from shardlib.core.sharding import ActivationSharding
    from shardlib.parallel.attention import make_attention
    from shardlib.parallel.dense_attention import gqa_attention

    if impl == "dense":
        return lambda q, k, v, pos: gqa_attention(q, k, v, is_causal=True, query_positions=pos, key_positions=pos)
    plan = make_attention(impl, "zigzag", ActivationSharding(preset_rules("dp"), mesh), length, block_k)
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
    print(header + f"{'compile s':>10}")
    dtype = jnp.dtype(args.dtype)
    for length in (int(x) for x in args.lengths.split(",")):
        q_shape, kv_shape = _shape(args, length)
        abstract = [jax.ShapeDtypeStruct(s, dtype, sharding=seq_sharded) for s in (q_shape, kv_shape, kv_shape)]
        pos = jax.ShapeDtypeStruct((args.batch, length), jnp.int32, sharding=seq_sharded)
        for impl in IMPLS:
            attend = _attention_fn(impl, mesh, length, args.block_k)

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
            mib = 1 / 2**20
            print(
                f"{length:>6} {impl:<10}{row['argument_bytes'] * mib:>10.2f}{row['output_bytes'] * mib:>9.2f}"
                f"{row['temp_bytes'] * mib:>10.2f}{row['peak_bytes'] * mib:>10.2f}{sent * mib:>10.2f}{seconds:>10.1f}"
            )
    kv = 2 * args.batch * args.kv_heads * args.head_dim * dtype.itemsize
    print(f"ring forward lower bound: (p-1)/p of K and V = {(args.seq - 1) / args.seq:.3f} x S x {kv} bytes per device")
    return rows


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
