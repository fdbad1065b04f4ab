"""``bench/pipeline.py --wall``: every schedule's measured wall time beside the lockstep model.

One worker process per stage, each pinned to a core (``bench.wall``), runs the
gradient step ``shardlib.training.setup.setup_training`` builds from a config with
``pipeline.schedule`` and ``pipeline.microbatches`` over a ``pipe`` mesh of
those p devices. In the same processes, and alternating with them:

* the control: the same work on one device (process 0): the schedule
  executor on a one-stage plan, GPipe with the same m microbatches, so the
  2-stage GPipe's wall time can be checked against it (ideal: each stage 1/p
  of it plus the fill, ``bench.wall.gpipe_ideal``);
* each action on one microbatch and one stage (``bench.pipeline_costs``), so
  the lockstep model can be given in seconds two ways: at ``tick_costs``
  (stage forwards) times the measured forward, and at the measured costs with
  the loss head added to the last virtual stage's forwards (``lockstep_at``).

Rounds alternate every side, one step each; the figures are medians over the
rounds, each round's step the slowest process's. The host's load from other
processes during the rounds is printed: the figures hold only when it is near 0.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from bench import pipeline_costs, wall

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-v", 2))
ROWS = 4  # rows per microbatch


@dataclasses.dataclass(frozen=True)
class Case:
    """One schedule at one m: its training setup's gradient step, ready to run."""

    name: str
    virtual: int
    microbatches: int
    recompute: bool  # pipeline.recompute: backwards rerun their forward, or forwards keep residuals
    schedule: object  # shardlib.parallel.pipeline.schedules.Schedule
    step: object  # () -> None


def lockstep_at(schedule, costs: dict[str, float], loss_head: float = 0.0) -> float:
    """The lockstep step time (each tick as long as its slowest action) at per-action costs in
    seconds of a whole stage (``costs`` of F, B, W; a chunk costs 1/v of it), the loss head's
    forward and backward added to every forward of the last virtual stage (the executor runs
    the head there). With ``loss_head`` 0 and costs proportional to ``tick_costs``, this is
    ``Schedule.lockstep_time`` in those units."""
    last = schedule.device_of(schedule.stages * schedule.virtual - 1)
    total = 0.0
    for row in schedule.actions:
        slowest = 0.0
        for stage, action in enumerate(row):
            if action is None:
                continue
            cost = costs[action.kind] / schedule.virtual
            if action.kind == "F" and (stage, action.chunk) == last:
                cost += loss_head
            slowest = max(slowest, cost)
        total += slowest
    return total


def _model_config(args) -> dict:
    layers = args.layers_per_stage * args.stages
    return {"vocab_size": args.vocab, "d_model": args.d_model, "n_layers": layers, "n_heads": 4, "n_kv_heads": 2}


def _config(model: dict, seq_len: int, name: str, m: int, v: int, recompute: bool = True):
    from shardlib.training.config import validate_config

    return validate_config(
        {
            "model": {**model, "d_ff": 3 * model["d_model"]},
            "batch_size": ROWS * m,
            "seq_len": seq_len,
            "pipeline": {"schedule": name, "microbatches": m, "virtual_stages": v, "recompute": recompute},
        }
    )


def _batch(cfg, sharding) -> dict:
    import jax

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    return {
        "inputs": jax.make_array_from_process_local_data(sharding, tokens[:, :-1]),
        "targets": jax.make_array_from_process_local_data(sharding, tokens[:, 1:]),
    }


def _pipelined_case(model: dict, args, mesh, name: str, v: int, m: int, recompute: bool) -> Case:
    import jax

    from shardlib.training.setup import setup_training

    cfg = _config(model, args.seq_len, name, m, v, recompute)
    run = setup_training(cfg, mesh)
    params, _ = run.init_state()
    batch = _batch(cfg, run.batch_sharding)
    compiled = run.grads.lower(params, batch).compile()
    step = lambda: jax.block_until_ready(compiled(params, batch))
    return Case(name, v, m, recompute, run.plan.pipeline.schedule, step)


def _sequential_step(model: dict, args, m: int):
    """The control: a 2-stage GPipe's work on this process's device, the executor on one stage."""
    import jax

    from shardlib.core.mesh import build_mesh, mesh_spec
    from shardlib.core.rules import preset_rules
    from shardlib.core.sharding import ActivationSharding
    from shardlib.models.pipeline_stages import make_pipeline_grads
    from shardlib.parallel.pipeline.plan import plan_pipeline
    from shardlib.training.parallel_plan import pipeline_settings
    from shardlib.training.setup import setup_training

    cfg = _config(model, args.seq_len, "gpipe", m, 1)
    device = jax.local_devices()[0]
    mesh = build_mesh(mesh_spec(), [device])
    run = setup_training(cfg, mesh)
    params, _ = run.init_state()
    batch = _batch(cfg, run.batch_sharding)
    plan = plan_pipeline(
        pipeline_settings(cfg),
        1,
        cfg.model.n_layers,
        cfg.batch_size,
        collectives_inside_stages=False,
        platform=device.platform,
    )
    shard = ActivationSharding(preset_rules("dp"), mesh)
    grads = jax.jit(make_pipeline_grads(run.model.graphdef, run.model.params, plan, mesh, shard))
    compiled = grads.lower(params, batch).compile()
    return lambda: jax.block_until_ready(compiled(params, batch))


def _gatherer():
    from jax.experimental import multihost_utils

    def gather(values: list[float]) -> list[list[float]]:
        return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float64))).tolist()

    return gather


def run_worker(args) -> int:
    """A worker's whole run (every process runs it; process 0 prints)."""
    index = wall.pin_and_join()
    import jax
    from jax.experimental import multihost_utils

    from shardlib.core.mesh import build_mesh, mesh_spec
    from shardlib.parallel.pipeline.actions import tick_costs

    p = args.stages
    here = index == 0
    say = print if here else (lambda *a, **k: None)
    noop = lambda: None
    multihost_utils.sync_global_devices("joined")  # the collectives' connections, while nobody is busy
    mesh = build_mesh(mesh_spec(pipe=p), jax.devices())
    model = _model_config(args)
    started = time.perf_counter()
    cases = []
    recomputes = {"true": (True,), "false": (False,), "both": (True, False)}[args.recompute]
    for m in (int(x) for x in args.microbatches.split(",")):
        for name, v in SCHEDULES:
            if name in args.schedules.split(",") and not (name == "interleaved-1f1b" and m % p):
                cases.extend(_pipelined_case(model, args, mesh, name, v, m, r) for r in recomputes)
    sides = {_side(c): c.step for c in cases}
    say(f"{len(cases)} pipelined steps compiled in {time.perf_counter() - started:.0f} s")
    # Every process builds the one-device sides too (on its own core), so that none waits long in a
    # collective while another compiles; only process 0's are timed (the others skip them).
    controls = sorted({c.microbatches for c in cases if c.name == "gpipe" and c.recompute})
    for m in controls:
        step = _sequential_step(model, args, m)
        sides[f"sequential/{m}"] = step if here else noop
    stage_cfg = _config(model, args.seq_len, "gpipe", 1, 1).model
    actions = pipeline_costs.action_steps(stage_cfg, args.layers_per_stage, ROWS, args.seq_len, jax.local_devices()[0])
    for name, step in actions.items():
        step()  # compiles it
        sides[f"action/{name}"] = step if here else noop
    for step in sides.values():  # warm up
        multihost_utils.sync_global_devices("warm")
        step()
    say(f"compiled and warmed up in {time.perf_counter() - started:.0f} s")
    only_here = [k for k in sides if k.startswith(("sequential/", "action/"))]
    barrier = lambda: multihost_utils.sync_global_devices("step")
    load = wall.HostLoad()
    load.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    times = wall.alternating_times(sides, args.repeats, barrier, _gatherer(), only_here)
    busy = [row[0] for row in _gatherer()([(time.process_time() - cpu0) / (time.perf_counter() - wall0)])]
    others = load.stop(sum(busy) * (time.perf_counter() - wall0))
    if here:
        spreads = {k: wall.Spread.of(v) for k, v in times.items()}
        say(
            "each process's CPU time / wall time over the rounds (at most 1: one core each): "
            + ", ".join(f"{b:.2f}" for b in busy)
        )
        print_tables(args, cases, controls, spreads, others, tick_costs)
    return 0


def _side(case: Case) -> str:
    return f"{case.name}/{case.microbatches}" + ("" if case.recompute else " kept")


def _measured_kinds(case: Case, costs: dict[str, float]) -> dict[str, float]:
    """Each action's measured seconds as this case's executor runs it (``tick_costs``'s kinds)."""
    split = case.schedule.split_backward
    if case.recompute:
        return {"F": costs["F"], "B": costs["split B"] if split else costs["B"], "W": costs["W"]}
    return {"F": costs["F"], "B": costs["input pullback"] if split else costs["B saved"], "W": costs["W"]}


def print_tables(args, cases, controls, spreads, others, tick_costs) -> None:
    p = args.stages
    med = {k: s.median for k, s in spreads.items()}
    costs = pipeline_costs.action_costs({k.split("/", 1)[1]: v for k, v in med.items() if k.startswith("action/")})
    forward = costs["F"]
    print(
        f"\n{p} stages, one process pinned to one core each (bench/wall.py); model {_model_config(args)}, "
        f"d_ff {3 * args.d_model}, microbatch {ROWS} x {args.seq_len} tokens; medians of {args.repeats} "
        f"alternating rounds; other processes' load during the rounds: {others:.2f} cores"
        + ("" if others < 0.1 else " (NOT an idle machine: the wall times are noisy)")
    )
    print("\nActions (one microbatch, one stage's layers, one device):\n")
    print("| action | ms | / F | tick_costs | spread (IQR / median) |")
    print("|---|---|---|---|---|")
    for name, ratio in pipeline_costs.MODEL_RATIOS.items():
        key = f"action/{name}"
        spread = f"{spreads[key].iqr_rel:.2f}" if key in spreads else "(B saved - input pullback)"
        print(f"| {name} | {1e3 * costs[name]:.2f} | {costs[name] / forward:.2f} | {ratio:g} | {spread} |")
    print("\nControl: 2-stage GPipe against the same work on one device (the executor on one stage):\n")
    print("| m | sequential ms | GPipe ms | GPipe / sequential | ideal ms | GPipe / ideal | spread GPipe, seq |")
    print("|---|---|---|---|---|---|---|")
    for m in controls:
        seq, gp = spreads[f"sequential/{m}"], spreads[f"gpipe/{m}"]
        ideal = wall.gpipe_ideal(seq.median, p, m)
        print(
            f"| {m} | {1e3 * seq.median:.1f} | {1e3 * gp.median:.1f} | {gp.median / seq.median:.3f} | "
            f"{1e3 * ideal:.1f} | {gp.median / ideal:.3f} | {gp.iqr_rel:.2f}, {seq.iqr_rel:.2f} |"
        )
    print("\nSchedules: lockstep model and measured wall time:\n")
    print(
        "| schedule | m | lockstep (F) | model ms (x F) | model ms (measured costs + loss) | measured ms | "
        "spread | measured / model | measured / model (measured costs) | vs GPipe |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        s = spreads[_side(c)]
        lockstep = float(c.schedule.lockstep_time(tick_costs(c.schedule, c.recompute))[0])
        measured_model = lockstep_at(c.schedule, _measured_kinds(c, costs), costs["loss"])
        gpipe = med.get(f"gpipe/{c.microbatches}" + ("" if c.recompute else " kept"))
        label = c.name + (" v=2" if c.virtual > 1 and c.name != "zb-v" else "") + ("" if c.recompute else " kept")
        print(
            f"| {label} | {c.microbatches} | {lockstep:.1f} | {1e3 * lockstep * forward:.1f} | "
            f"{1e3 * measured_model:.1f} | {1e3 * s.median:.1f} | {s.iqr_rel:.2f} | "
            f"{s.median / (lockstep * forward):.2f} | {s.median / measured_model:.2f} | "
            + (f"{s.median / gpipe:.2f} |" if gpipe else "- |")
        )
