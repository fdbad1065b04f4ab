"""How often a pipelined step runs each layer's forward and backward: what stage collectives are counted by.

Attention over ``seq`` and the experts' all-to-alls run inside the pipeline's
stages (``shardlib.parallel.pipeline.executor``), so their traffic follows the
executor's actions, not ``grad_accum``: every microbatch's forward (F) runs a
chunk's layers once, and its backward (B, or a split table's input-gradient
half) recomputes that forward before differentiating it (once more under
``remat: full``; with ``pipeline.recompute: false`` only the remat's); a
split table's W runs no layer. How many of them run:

* ``cond`` branching: the table's own, m per chunk: per device and step,
  2 m forwards (3 m under remat) and m backwards of each of its layers.
* ``select`` (XLA:CPU with collectives inside the stages): every tick
  computes every branch the table uses and keeps one, so each tick runs
  each used forward branch and each used backward branch; what the compiled
  program executes, and what ``measure`` counts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shardlib.analysis.report.layout import Layout
from shardlib.parallel.pipeline.plan import PipelineSettings, plan_pipeline
from shardlib.parallel.pipeline.table import (
    BWD,
    BWD_FIRST,
    BWD_INPUT,
    BWD_INPUT_FIRST,
    FWD,
    FWD_FIRST,
    FWD_LAST,
    FWD_ONLY,
)

_FORWARDS = (FWD, FWD_FIRST, FWD_LAST, FWD_ONLY)
_BACKWARDS = (BWD, BWD_FIRST, BWD_INPUT, BWD_INPUT_FIRST)


@dataclasses.dataclass(frozen=True)
class LayerPasses:
    """Per device and step, summed over the device's layers: forward and backward executions of a layer."""

    forward: int
    backward: int


def stage_branching(layout: Layout, platform: str | None) -> str:
    """The pipeline's branching on ``platform`` (None: a GPU's, ``cond``), by the plan builder's rule."""
    cfg, sizes = layout.cfg, layout.sizes
    choice = cfg.pipeline.branching
    if choice != "auto":
        return choice
    moe = getattr(cfg.model, "moe", None)
    token_split = any(sizes[a] > 1 for a in (*layout.batch_axes, "seq"))
    inside = sizes["model"] > 1 or sizes["seq"] > 1 or bool(moe and moe.n_experts and token_split)
    return "select" if platform == "cpu" and inside else "cond"


def pipelined_layer_passes(layout: Layout, platform: str | None = None) -> LayerPasses:
    """``LayerPasses`` of a pipelined step (``pipe > 1``) under its branching on ``platform``."""
    cfg = layout.cfg
    p = cfg.pipeline
    layers = layout.layers_per_device
    # Forwards a backward runs before differentiating: the executor's recomputation, and remat's.
    recompute = int(p.recompute) + (cfg.model.remat == "full")
    if stage_branching(layout, platform) == "cond":
        m = p.microbatches * layout.microbatches
        return LayerPasses(m * layers * (1 + recompute), m * layers)
    table = plan_pipeline(
        PipelineSettings(p.schedule, p.microbatches, p.virtual_stages, p.branching, p.recompute),
        layout.sizes["pipe"],
        cfg.model.n_layers,
        cfg.batch_size,
        collectives_inside_stages=True,
        platform="cpu",
    ).table
    used = set(np.unique(table.branch).tolist())
    forwards = sum(code in used for code in _FORWARDS)
    backwards = sum(code in used for code in _BACKWARDS)
    chunk = layers // p.virtual_stages
    ticks = table.schedule.ticks * layout.microbatches
    return LayerPasses(ticks * chunk * (forwards + backwards * recompute), ticks * chunk * backwards)
