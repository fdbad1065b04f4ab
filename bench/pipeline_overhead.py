"""What the pipeline executor costs on one device: its gradient step against the plain model's.

    python bench/pipeline_overhead.py [--config configs/gpt2-124m.yaml] [--microbatches 4]
                                      [--batch-size 16] [--seq-len 1024] [--repeats 10]

Every side computes the loss and gradients of the same batch, split into the
same m microbatches: the sequential sides with the plain model and gradient
accumulation (`grad_accum=m`), once as configured and once with
`model.remat=full` (the recomputation the executor's backward does: it keeps
only stage inputs and recomputes the stage forward), and the pipeline side
with the schedule executor on a one-stage `pipe` axis (every tick's branch,
the activation buffers and the loss/gradient plumbing, without any neighbour
to talk to), once recomputing each forward in its backward (the default) and
once keeping the forward's residuals for it (`pipeline.recompute=false`). The
sides alternate, one step each per round, so the ratios of their median step
times compare like with like on a noisy machine: pipeline / sequential is the
executor's whole overhead, pipeline / sequential-with-remat what is left of it
beyond the recomputation, and pipeline-saved / sequential the overhead without
it (ticks, branches, buffers). The loss each reports is printed so a mismatch shows. It
uses JAX's default backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardlib.parallel.pipeline.schedules import SINGLE_CHUNK, TWO_CHUNK


def _alternating_median_ms(sides: dict, args, repeats: int) -> dict[str, tuple[float, object]]:
    """name -> (median step ms, last output), the sides run one step each per round."""
    import jax

    outs = {name: jax.block_until_ready(fn(*args)) for name, fn in sides.items()}  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            outs[name] = jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * statistics.median(times[name]), outs[name]) for name in sides}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt2-124m.yaml")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--schedule", default="1f1b", choices=SINGLE_CHUNK + TWO_CHUNK)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from shardlib.core.mesh import build_mesh, mesh_spec
    from shardlib.core.rules import preset_rules
    from shardlib.core.sharding import ActivationSharding
    from shardlib.models.pipeline_stages import make_pipeline_grads
    from shardlib.parallel.pipeline.plan import PipelineSettings, plan_pipeline
    from shardlib.training.config import load_config
    from shardlib.training.setup import setup_training

    m = args.microbatches
    overrides = [f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", "sharding=dp", f"grad_accum={m}"]
    cfg = load_config(args.config, overrides)
    device = jax.devices()[0]
    mesh = build_mesh(mesh_spec(), [device])
    run = setup_training(cfg, mesh)  # its grads: the plain model, accumulated over m microbatches
    remat = setup_training(load_config(args.config, [*overrides, "model.remat=full"]), mesh)
    params, _ = run.init_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    batch = {"inputs": jax.device_put(tokens[:, :-1]), "targets": jax.device_put(tokens[:, 1:])}
    shard = ActivationSharding(preset_rules("dp"), mesh)

    def plan(recompute: bool):
        virtual = 2 if args.schedule in TWO_CHUNK else 1
        settings = PipelineSettings(args.schedule, m, virtual, "cond", recompute)
        return plan_pipeline(
            settings, 1, cfg.model.n_layers, cfg.batch_size, collectives_inside_stages=False, platform=device.platform
        )

    def pipelined(recompute: bool):
        return jax.jit(make_pipeline_grads(run.model.graphdef, run.model.params, plan(recompute), mesh, shard))

    sides = {
        "sequential": run.grads,
        "sequential+remat": remat.grads,
        "pipeline": pipelined(True),
    }
    sides["pipeline-saved"] = pipelined(False)  # split tables, 1F1B's among them, keep the tapped residuals
    results = _alternating_median_ms(sides, (params, batch), args.repeats)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(
        f"device: {device.device_kind}; config {args.config}; batch {cfg.batch_size} x {cfg.seq_len}, "
        f"m={m}, schedule {args.schedule} on one stage; medians of {args.repeats}, sides alternating"
    )
    print(f"{'':<18}{'step ms':>10}{'tokens/s':>12}{'loss':>12}")
    for name, (ms, out) in results.items():
        print(f"{name:<18}{ms:>10.2f}{tokens_per_step / ms * 1e3:>12.0f}{float(out[0]):>12.6f}")
    pipe_ms = results["pipeline"][0]
    print(f"overhead: pipeline / sequential = {pipe_ms / results['sequential'][0]:.3f}")
    print(f"beyond the recomputation: pipeline / sequential+remat = {pipe_ms / results['sequential+remat'][0]:.3f}")
    if "pipeline-saved" in results:
        print(
            f"without it: pipeline-saved / sequential = {results['pipeline-saved'][0] / results['sequential'][0]:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
