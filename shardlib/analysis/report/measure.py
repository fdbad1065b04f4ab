"""Lower and compile the real training step on a mesh, and read what the compiled program does.

Nothing is allocated or executed: parameters, optimizer state and the batch
are ``jax.ShapeDtypeStruct``s carrying the run's shardings
(``shardlib.training.train_state.abstract_state``), and the trainer's own jitted step
(``shardlib.training.trainer.setup_training``) is lowered and compiled against them.
The compiled program then gives its HLO (collectives, dot FLOPs), its memory
analysis and its cost analysis.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from shardlib.analysis.report.collectives import Collective, dot_flops, find_collectives
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.core.mesh import mesh_axis_sizes
from shardlib.parallel.pipeline.plan import PipelinePlan
from shardlib.training.config import Config


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes from ``compiled.memory_analysis()``.

    ``peak`` = arguments + outputs - aliased + temporaries: with the state
    donated, outputs alias arguments and the sum is what the step holds at once
    (XLA's own peak within the temporaries is not exposed, so temporaries count whole).
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"peak": self.peak}


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the compiled step does, per device."""

    collectives: list[Collective]
    memory: CompiledMemory | None
    xla_flops: float | None  # cost_analysis()["flops"]
    dot_flops: float  # dots in the HLO times their trip counts
    compile_seconds: float
    unknown_trip_counts: int
    platform: str


def abstract_batch(cfg: Config, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The {"inputs", "targets"} batch as int32 ShapeDtypeStructs with the run's batch sharding."""
    shape = (cfg.batch_size, cfg.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for name in ("inputs", "targets")}


def compile_train_step(cfg: Config, mesh: jax.sharding.Mesh):
    """(TrainingSetup, compiled step) for ``cfg`` on ``mesh``, from abstract inputs only."""
    from shardlib.training.train_state import abstract_state
    from shardlib.training.trainer import setup_training

    run = setup_training(cfg, mesh)
    params, opt_state = abstract_state(run.model, run.tx, run.shardings)
    batch = abstract_batch(cfg, run.batch_sharding)
    with jax.set_mesh(mesh):
        compiled = run.train_step.lower(params, opt_state, batch).compile()
    return run, compiled


def compiled_memory(compiled) -> CompiledMemory | None:
    """What the compiled program holds per device (None where the backend does not say)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it; the report says so
        return None
    if stats is None:
        return None
    return CompiledMemory(
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
    )


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list | tuple):  # older jax returned one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def measure_compiled(compiled, mesh: jax.sharding.Mesh, compile_seconds: float = 0.0) -> Measured:
    """Collectives, memory and FLOPs of an already compiled SPMD program over ``mesh``."""
    module = parse_hlo(compiled.as_text())
    collectives = find_collectives(module, mesh_axis_sizes(mesh))
    return Measured(
        collectives=collectives,
        memory=compiled_memory(compiled),
        xla_flops=_xla_flops(compiled),
        dot_flops=dot_flops(module),
        compile_seconds=compile_seconds,
        unknown_trip_counts=module.unknown_trip_counts,
        platform=mesh.devices.flat[0].platform,
    )


def measure(cfg: Config, mesh: jax.sharding.Mesh) -> Measured:
    """Compiles ``cfg``'s train step on ``mesh`` (nothing runs) and measures it.

    With ``outer`` (DiLoCo, local SGD) the outer step is compiled too, and its
    collectives join the inner step's at 1/H of a run per step: bytes per step
    averaged over the period, as the analytic model states them.
    """
    start = time.perf_counter()
    run, compiled = compile_train_step(cfg, mesh)
    outer = _outer_collectives(run, mesh)
    measured = measure_compiled(compiled, mesh, time.perf_counter() - start)
    if run.plan.pipeline is not None:
        sends = pipeline_sends_taken(measured.collectives, run.plan.pipeline, mesh)
        measured = dataclasses.replace(measured, collectives=sends)
    if outer:
        measured = dataclasses.replace(measured, collectives=[*measured.collectives, *outer])
    return measured


def _outer_collectives(run, mesh: jax.sharding.Mesh) -> list[Collective]:
    """The outer steps' collectives, each counted 1/H times per step (every fragment's, when streaming:
    each fragment syncs once per H steps); none without ``outer``."""
    from shardlib.training.train_state import abstract_state

    every = run.plan.outer.settings.every if run.outer_steps else 1
    out = []
    for f, outer_step in enumerate(run.outer_steps):
        with jax.set_mesh(mesh):
            compiled = outer_step.lower(*abstract_state(run.model, run.tx, run.shardings)).compile()
        found = find_collectives(parse_hlo(compiled.as_text()), mesh_axis_sizes(mesh))
        name = "outer step" if len(run.outer_steps) == 1 else f"outer step of fragment {f}"
        out += [dataclasses.replace(c, count=c.count / every, op_name=f"{name}: {c.op_name}") for c in found]
    return out


def stage_pairs(mesh: jax.sharding.Mesh, axis: str, pairs) -> frozenset[tuple[int, int]]:
    """(source, target) device positions (in ``mesh.devices``) of a permute over ``axis`` between the given
    (source, target) positions along it, at every position of the other axes."""
    index = np.moveaxis(np.arange(mesh.size).reshape(mesh.devices.shape), list(mesh.axis_names).index(axis), 0)
    return frozenset((int(a), int(b)) for s, t in pairs for a, b in zip(index[s].flat, index[t].flat, strict=True))


def pipeline_sends_taken(collectives: list[Collective], pipeline: PipelinePlan, mesh: jax.sharding.Mesh):
    """The pipeline's permutes counted on the ticks the plan's table takes them, not on every tick.

    Each tick's permute is one branch of a switch over the step's distinct send
    patterns (``PipelinePlan.send_patterns``); the index is the same on every
    device, which the HLO alone cannot resolve; the table can. A permute is the
    pipeline's when its pairs are one pattern's and it runs once per tick.
    Ops with the same pairs (a pattern both directions use, as on two stages)
    share that pair set's runs evenly (the total is exact).
    """
    ticks = pipeline.schedule.ticks
    runs = {stage_pairs(mesh, "pipe", pairs): n for pairs, n in pipeline.send_patterns.runs().items()}
    per_tick = [c for c in collectives if c.kind == "collective-permute" and c.pairs in runs and c.count % ticks == 0]
    sharing = {pairs: sum(c.pairs == pairs for c in per_tick) for pairs in runs}
    out = []
    for c in collectives:
        if any(c is p for p in per_tick):
            c = dataclasses.replace(c, count=c.count // ticks * runs[c.pairs] / sharing[c.pairs])
        out.append(c)
    return out
