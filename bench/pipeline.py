"""Pipeline schedules side by side: bubble, compiled memory, step time, bytes between stages.

    python bench/pipeline.py [--stages 4] [--microbatches 4,8,16] [--schedules zb-h1,zb-v] [--repeats 5]
    python bench/pipeline.py --wall [--stages 2] [--repeats 7]     # measured wall time, one core per stage

For every schedule at p stages and each m: the bubble its table predicts and
the published formula's (one tick per action), the step time in stage
forwards and the bubble when every tick lasts as long as its slowest action
(``Schedule.lockstep_time`` at the executor's ``tick_costs``: how an SPMD
step runs, its permutes holding the stages together), the compiled gradient step's temporary memory per
device beside the report's estimate of its activations, the compiled eval step's (the
schedule's forward-only table: each stage holds its own layers), the measured time of a
gradient step (median of --repeats, after one compile), and the bytes each
device sends to its neighbours, a mean over the devices (each permute's
size and pairs from the compiled HLO, times the ticks the table runs it on)
against the minimum: every microbatch crosses each of the p v - 1
boundaries between virtual stages once forward and once backward, so the p
devices send 2 m (p v - 1) microbatches' activations or gradients per step
(a V's turn stays on its device: 2 m (2p - 2)).

Runs on p emulated CPU devices by default (the pipe axis alone, so the
executor uses real branches), or on whatever accelerators JAX finds with
--platform gpu. Numbers from one run are comparable with each other only.

On emulated CPU devices the p stages share the host's cores, so the step
time is the work of all stages together (idle branches and recomputation
included), not a pipeline's wall time. ``--wall`` measures that instead: one
process per stage, each pinned to a core of its own, the lockstep model beside
the measured step, a control (2-stage GPipe against the same work on one
device) and each action's measured cost, as markdown tables
(``bench/pipeline_wall.py``; it needs p cores, so p = 2 on a 2-core machine). The zero-bubble table's B recomputes the stage forward (as
every backward here does) and its W runs only the weight-gradient matmuls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-v", 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=None, help="default 4 (--wall: 2)")
    parser.add_argument("--microbatches", default="4,8,16")
    parser.add_argument("--schedules", default=",".join(name for name, _ in SCHEDULES))
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (--wall: 7 rounds)")
    parser.add_argument("--platform", default="cpu")
    parser.add_argument("--wall", action="store_true", help="measured wall time, one process pinned per stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a --wall run's process
    parser.add_argument("--layers-per-stage", type=int, default=4, help="--wall: the model's layers per stage")
    parser.add_argument("--d-model", type=int, default=128, help="--wall: the model's width")
    parser.add_argument("--vocab", type=int, default=256, help="--wall: the model's vocabulary")
    parser.add_argument("--seq-len", type=int, default=64, help="--wall: tokens per row (4 rows per microbatch)")
    parser.add_argument(
        "--recompute",
        choices=("true", "false", "both"),
        default="true",
        help="--wall: pipeline.recompute (false: forwards keep their residuals, split 1F1B); both: side by side",
    )
    args = parser.parse_args(argv)
    args.stages = args.stages or (2 if args.wall else 4)
    args.repeats = args.repeats or (7 if args.wall else 5)
    if args.wall:
        return _wall(args, argv if argv is not None else sys.argv[1:])

    import jax

    if args.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", args.stages)
    import numpy as np

    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.analysis.report.measure import measure_compiled, pipeline_sends_taken
    from shardlib.analysis.report.memory import activation_dtype_on, estimate_memory
    from shardlib.core.mesh import build_mesh, mesh_spec
    from shardlib.parallel.pipeline.actions import tick_costs
    from shardlib.training.config import validate_config
    from shardlib.training.setup import setup_training

    p = args.stages
    mesh = build_mesh(mesh_spec(pipe=p), jax.devices(args.platform)[:p])
    model = {"vocab_size": 256, "d_model": 128, "n_layers": 16, "n_heads": 4, "n_kv_heads": 2, "d_ff": 384}
    print(f"{p} stages on {jax.devices(args.platform)[0].platform}; model {model}")
    print(
        f"{'schedule':<22}{'m':>4}{'bubble':>9}{'formula':>9}{'lockstep':>9}{'lock bub':>9}{'temp MiB':>10}"
        f"{'est MiB':>9}{'eval MiB':>9}{'step ms':>10}{'sent KiB':>10}{'min KiB':>9}{'ratio':>7}"
    )
    for m in (int(x) for x in args.microbatches.split(",")):
        for name, v in SCHEDULES:
            if name not in args.schedules.split(",") or name == "interleaved-1f1b" and m % p:
                continue
            cfg = validate_config(
                {
                    "model": model,
                    "batch_size": 4 * m,
                    "seq_len": 64,
                    "pipeline": {"schedule": name, "microbatches": m, "virtual_stages": v},
                }
            )
            run = setup_training(cfg, mesh)
            params, _ = run.init_state()
            batch = {
                k: jax.device_put(np.zeros((cfg.batch_size, cfg.seq_len), np.int32), run.batch_sharding)
                for k in ("inputs", "targets")
            }
            compiled = run.grads.lower(params, batch).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            eval_temp = run.eval_step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
            # Each tick's permute is the branch of a switch over the table's send patterns (the same
            # on every device); the HLO gives each one's size and pairs, the table how many ticks take it.
            measured = measure_compiled(compiled, mesh, 0.0).collectives
            permutes = [c for c in pipeline_sends_taken(measured, run.plan.pipeline, mesh) if c.axes == ("pipe",)]
            sent = sum(c.total_wire_bytes for c in permutes if c.kind == "collective-permute")
            micro_bytes = 4 * cfg.seq_len * model["d_model"] * 4  # [4, seq, d] fp32 per microbatch
            # Each microbatch crosses the boundaries between devices forward and back: a mean per device of
            minimum = 2 * m * run.plan.pipeline.schedule.cross_device_boundaries() / p * micro_bytes
            times = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, batch))
                times.append(time.perf_counter() - start)
            step_ms = 1e3 * statistics.median(times[1:])
            schedule = run.plan.pipeline.schedule
            bubble, formula = float(schedule.bubble_fraction()), float(schedule.expected_bubble())
            dtype = activation_dtype_on(args.platform, cfg.model.compute_dtype)
            estimate = estimate_memory(resolve_layout(cfg, dict(mesh.shape)), dtype).activations
            lockstep, lock_bubble = schedule.lockstep_time(tick_costs(schedule))
            print(
                f"{name + (f' v={v}' if v > 1 and name != 'zb-v' else ''):<22}{m:>4}{bubble:>9.3f}{formula:>9.3f}"
                f"{float(lockstep):>9.1f}{float(lock_bubble):>9.3f}{temp / 2**20:>10.2f}"
                f"{estimate / 2**20:>9.2f}{eval_temp / 2**20:>9.2f}{step_ms:>10.1f}{sent / 1024:>10.0f}{minimum / 1024:>9.0f}"
                f"{sent / minimum:>7.2f}"
            )
    return 0


def _wall(args, argv) -> int:
    """--wall: this script again as one worker per stage (bench/wall.py), or, in a worker, its run."""
    from bench import pipeline_wall, wall

    if args.worker:
        return pipeline_wall.run_worker(args)
    if args.platform != "cpu":
        raise SystemExit("--wall measures emulated CPU devices, one process per core; --platform must be cpu")
    return wall.launch([os.path.abspath(__file__), *argv, "--worker"], args.stages)


if __name__ == "__main__":
    sys.exit(main())
