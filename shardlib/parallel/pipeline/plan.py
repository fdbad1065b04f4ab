"""What is static about a pipelined step: the user's settings, the compiled schedule, the layer layout.

``plan_pipeline`` turns typed settings into a ``PipelinePlan``: the compiled
schedule table, how stages branch, and where each logical layer is stored.
Nothing here knows a model: a model's adapter (the project's transformer has
one in its model zoo) cuts its model into ``StageFunctions``
and runs the plan's table with ``pipeline_loss_and_grads`` /
``pipeline_loss`` (``shardlib.parallel.pipeline.executor``).

Layer layout: the stacked layers are sharded contiguously over the pipeline
axis, and with ``virtual_stages > 1`` device s runs its slice as chunks of
virtual stages s, p + s, ..., so the stored order is not the logical one
(``layer_order``). ``logical_layers`` undoes it for anything that runs the
layers in sequence, and checkpoints record the order so that ``relayout``
can move them onto another pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardlib.core.rules import Rules, rule_axes
from shardlib.parallel.pipeline.executor import Branching
from shardlib.parallel.pipeline.schedules import Schedule, forward_only, make_schedule, placement
from shardlib.parallel.pipeline.sends import SendPatterns, layer_order, send_patterns
from shardlib.parallel.pipeline.table import TickTable, compile_table

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """What the user chose: schedule name, microbatches, chunks per device, branching (auto|cond|select),
    and whether backwards recompute their forward (``pipeline_loss_and_grads``'s ``recompute``)."""

    schedule: str = "1f1b"
    microbatches: int = 4
    virtual_stages: int = 1
    branching: str = "auto"
    recompute: bool = True


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """Everything static about a pipelined step.

    table: the compiled schedule (``shardlib.parallel.pipeline.table.TickTable``), [ticks, stages] arrays.
    branching: ``cond`` (a stage runs only its branch) or ``select`` (all, then choose).
    layer_order: [n_layers] logical layer index of each stored layer.
    recompute: backwards recompute their chunk's forward (else forwards keep their residuals).
    axis: the mesh axis the stages are laid over (the executor's ``pipe_axis``).
    """

    table: TickTable
    branching: Branching
    layer_order: np.ndarray
    recompute: bool = True
    axis: str = "pipe"

    @property
    def schedule(self):
        return self.table.schedule

    @functools.cached_property
    def send_patterns(self) -> SendPatterns:
        """Each tick's permute pairs (``sends.send_patterns``): what the step sends, as a table."""
        return send_patterns(self.table)

    @functools.cached_property
    def eval_table(self) -> TickTable:
        """The eval step's table: the schedule's forwards alone, on the same devices (``forward_only``)."""
        return compile_table(forward_only(self.schedule))


def schedule_for(settings: PipelineSettings, stages: int, moe: bool = False) -> Schedule:
    """The table ``settings`` run on ``stages`` devices: without recomputation, 1F1B's tables split
    each backward into B and W back to back (``make_schedule``'s ``split``), so that every action
    costs one chunk's forward (``actions.tick_costs``) and no lockstep tick waits on a dearer one.
    Not on one stage (no tick has another stage to wait for; the split's extra ticks and slot
    copies would only cost), nor for an MoE model (``moe``), whose stage statistics a split F
    without recomputation cannot return (``StageActions``)."""
    split = not settings.recompute and not moe and stages > 1
    return make_schedule(settings.schedule, stages, settings.microbatches, settings.virtual_stages, split=split)


def plan_pipeline(
    settings: PipelineSettings,
    stages: int,
    n_layers: int,
    batch_size: int,
    *,
    collectives_inside_stages: bool,
    platform: str,
    moe_period: int = 0,
    axis: str = "pipe",
) -> PipelinePlan:
    """The compiled schedule for ``settings`` over ``stages`` devices; errors name the setting that does not fit.

    ``collectives_inside_stages``: stage branches hold collectives (a mesh axis
    the partitioner handles, ``model``, has size > 1; or ``seq``; or an MoE
    model's token axes). ``moe_period``: an MoE model's ``moe.period`` (0:
    dense), whose groups of layers must not straddle two chunks. ``axis``: the
    mesh axis of the ``stages`` devices (``pipeline_axis`` reads it from a rule table).
    """
    chunks = stages * settings.virtual_stages
    if n_layers % chunks:
        raise ValueError(
            f"model.n_layers={n_layers} does not divide into {chunks} pipeline chunks "
            f"({axis}={stages} x pipeline.virtual_stages={settings.virtual_stages})"
        )
    if moe_period and (n_layers // chunks) % moe_period:
        raise ValueError(
            f"model.moe.period={moe_period} does not divide the {n_layers // chunks} layers of each pipeline "
            f"chunk (model.n_layers={n_layers} over {axis}={stages} x pipeline.virtual_stages="
            f"{settings.virtual_stages}): a chunk must hold whole groups of dense layers and their MoE layer"
        )
    if batch_size % settings.microbatches:
        raise ValueError(f"batch_size={batch_size} does not divide into pipeline.microbatches={settings.microbatches}")
    table = compile_table(schedule_for(settings, stages, moe=bool(moe_period)))
    if moe_period and not settings.recompute and table.schedule.split_backward:
        raise ValueError(
            f"pipeline.recompute=false does not apply to {settings.schedule} with an MoE model: a split "
            "table's forward cannot keep its residuals and return the router statistics; use 1f1b, gpipe "
            "or interleaved-1f1b, or recompute=true"
        )
    return PipelinePlan(
        table,
        _branching(settings.branching, collectives_inside_stages, platform),
        layer_order(n_layers, stages, settings.virtual_stages, placement(settings.schedule)),
        settings.recompute,
        axis,
    )


def pipeline_axis(rules: Rules) -> str:
    """The mesh axis a rule table lays the stacked layers over (``layers``), the pipeline's axis: ``pipe``
    in shardlib's presets, whatever ``shardlib.core.rules.rename_mesh_axes`` made of it in a project's."""
    axes = rule_axes(rules, "layers")
    if len(axes) != 1:
        raise ValueError(
            f"the rules map 'layers' to {axes or 'no mesh axis'}; a pipeline needs exactly one mesh axis for its "
            "stages (rename_mesh_axes(rules, {'pipe': 'your_axis'}) maps shardlib's)"
        )
    return axes[0]


def _branching(choice: str, collectives_inside_stages: bool, platform: str) -> Branching:
    """``cond`` unless XLA:CPU would run collectives inside stage-dependent branches.

    Collectives over the manual axes (``pipe`` and the batch axes) sit outside
    the branches; only axes the partitioner handles put collectives inside
    them, and XLA:CPU runs every collective as one rendezvous of all local
    devices, so a branch some devices skip would hang.
    """
    if choice != "auto":
        return choice  # type: ignore[return-value]
    return "select" if platform == "cpu" and collectives_inside_stages else "cond"


def logical_layers(layers: PyTree, order: np.ndarray) -> PyTree:
    """The stacked layers in logical order, from the pipeline's stored order (a gather on the layer axis)."""
    if np.array_equal(order, np.arange(len(order))):
        return layers
    inverse = jnp.asarray(np.argsort(order))
    return jax.tree.map(lambda w: jnp.take(w, inverse, axis=0), layers)


def relayout_index(saved_order: np.ndarray, new_order: np.ndarray) -> np.ndarray | None:
    """Index i of the new stack = stored index (saved layout) of logical layer new_order[i]; None if equal."""
    saved_order, new_order = np.asarray(saved_order), np.asarray(new_order)
    if saved_order.shape != new_order.shape:
        raise ValueError(f"a checkpoint of {len(saved_order)} layers cannot take a layout of {len(new_order)}")
    if np.array_equal(saved_order, new_order):
        return None
    return np.argsort(saved_order)[new_order]
