"""The transformer as a client of the pipeline executor: its pieces, and its loss and gradients through a schedule.

``make_pipeline_grads`` cuts the NNX transformer into the executor's
``StageFunctions`` (embedding, chunks of the layer stack, head + loss) and
runs a ``PipelinePlan``'s table through the public executor
(``shardlib.parallel.pipeline.executor.pipeline_loss_and_grads``), as any
model's adapter would; ``make_pipeline_loss`` is the eval step's, the same
pieces through the schedule's forward-only table (``pipeline_loss``), so each
stage runs only the layers it stores. An MoE model's stages are
``shardlib.models.moe_pipeline_stages``. Nothing here reads the training
config: the parallel plan (``shardlib.training.parallel_plan``) passes settings in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from shardlib.core.rules import rule_axes, without_axes
from shardlib.core.sharding import ActivationSharding
from shardlib.models.layers import BlockWeights, causal_gqa_attention, weight_grads
from shardlib.models.moe_pipeline_stages import MoEStages
from shardlib.parallel.accumulation import split_microbatches
from shardlib.parallel.attention import AttentionPlan
from shardlib.parallel.pipeline.actions import StageFunctions
from shardlib.parallel.pipeline.executor import pipeline_loss, pipeline_loss_and_grads
from shardlib.parallel.pipeline.plan import PipelinePlan

PyTree = Any


def _chunk_weight_grads(chunk: dict, inputs: dict, dys: dict) -> dict:
    """``shardlib.models.layers.weight_grads`` for every layer of a chunk ([n, ...] each): the W of a split backward."""
    return {"layers": jax.vmap(weight_grads)(BlockWeights(**chunk["layers"]), inputs, dys)._asdict()}


@dataclasses.dataclass(frozen=True)
class _StageLayout:
    """How a stage sees its tokens: the manual token axes and each local block's rotary positions.

    batch_axes, length_axes: the mesh axes the rows and the positions are split over (manual in the stages).
    order: [seq_len] original position of each stored token (the attention's layout), or None.
    """

    batch_axes: tuple[str, ...]
    length_axes: tuple[str, ...]
    order: np.ndarray | None

    @property
    def token_axes(self) -> tuple[str, ...]:
        return (*self.batch_axes, *self.length_axes)

    def positions(self, x_BxLxD: jax.Array) -> jax.Array:
        """[B, L/seq] int32: the original positions of this device's block of every sequence."""
        batch, local = x_BxLxD.shape[:2]
        first = jax.lax.axis_index(self.length_axes) * local if self.length_axes else 0
        if self.order is None:  # natural order, split contiguously
            positions_L = first + jnp.arange(local, dtype=jnp.int32)
        else:
            positions_L = jax.lax.dynamic_slice(jnp.asarray(self.order, jnp.int32), (first,), (local,))
        return jnp.broadcast_to(positions_L, (batch, local))


def _stage_layout(
    shard: ActivationSharding | None, mesh: jax.sharding.Mesh, attention: AttentionPlan | None
) -> tuple[_StageLayout, Callable]:
    """The stages' token layout (the rules' batch and length axes, made manual) and the attention
    kernel that runs on a stage's own block of the sequence."""
    batch_axes = rule_axes(shard.rules, "batch") if shard is not None else ()
    length_axes = tuple(a for a in rule_axes(shard.rules, "length") if a in mesh.shape) if shard is not None else ()
    attention = attention or AttentionPlan(causal_gqa_attention, local=causal_gqa_attention)
    local_attention = attention.local
    if local_attention is None:  # its own function is whole-sequence attention: right where seq has one device
        if any(mesh.shape[a] > 1 for a in length_axes):
            raise ValueError("this attention has no kernel for a pipeline stage's own block of the sequence")
        local_attention = attention.fn
    return _StageLayout(batch_axes, length_axes, attention.order), local_attention


def _merger(graphdef: nnx.GraphDef, abstract_params: PyTree) -> Callable:
    """``merged(outer=None)``: the model with ``outer``'s parameters and placeholders for the rest.

    Each piece reads only some parameters (run_layers takes its weights as an
    argument); placeholders keep the merged tree complete without bringing the
    whole stack into every piece.
    """

    def merged(outer=None):
        tree = jax.tree.map(lambda a: jnp.zeros((1,), a.dtype), abstract_params)
        return nnx.merge(graphdef, {**tree, **(outer or {})})

    return merged


def _dense_stage_functions(merged: Callable, layout: _StageLayout, kwargs: dict, layer_kwargs: dict) -> StageFunctions:
    """The transformer cut into the executor's pieces, each on a stage's own rows and sequence block."""

    def stage(chunk, x):
        return merged().run_layers(
            BlockWeights(**chunk["layers"]), x, positions_BxL=layout.positions(x), **layer_kwargs
        )

    def tapped_stage(chunk, x, probes):
        return merged().run_layers_tapped(
            BlockWeights(**chunk["layers"]), x, probes, positions_BxL=layout.positions(x), **layer_kwargs
        )

    return StageFunctions(
        embed=lambda outer, inputs: merged(outer).embed_tokens(inputs["tokens"], **kwargs),
        stage=stage,
        # Transformer.loss: the head's cross-entropy, chunked with model.loss_chunk as the eval step's is.
        loss=lambda outer, x, inputs: merged(outer).loss(x, inputs["targets"], **kwargs),
        # Split (zero-bubble) tables: B records each weight use, W takes the weight gradients from it.
        tapped_stage=tapped_stage,
        weight_grads=_chunk_weight_grads,
    )


@dataclasses.dataclass(frozen=True)
class _Stages:
    """The transformer cut into the executor's pieces, and how the step hands them its arrays.

    fns: the stage functions; layout: the stages' token layout; moe: an MoE model's stages, or None;
    stacked_names: the params split over ``pipe`` (the layers, and an MoE model's experts).
    """

    fns: StageFunctions
    layout: _StageLayout
    moe: MoEStages | None
    stacked_names: tuple[str, ...]
    microbatches: int
    mesh: jax.sharding.Mesh
    shard: ActivationSharding | None
    param_specs: PyTree | None
    pipe_axis: str

    def arguments(self, params: PyTree, batch: dict) -> tuple[tuple, dict]:
        """(stacks, outer, {"tokens", "targets"} per microbatch) and the keywords the executor takes for them."""
        inputs, targets = batch["inputs"], batch["targets"]
        if self.layout.order is not None:  # the attention's layout: tokens and targets alike
            inputs, targets = inputs[:, self.layout.order], targets[:, self.layout.order]
        outer = {k: v for k, v in params.items() if k not in self.stacked_names}
        stacks = {k: params[k] for k in self.stacked_names}
        specs = self.param_specs or {}
        m = self.microbatches
        microbatches = {
            "tokens": split_microbatches(inputs, m, self.shard),
            "targets": split_microbatches(targets, m, self.shard),
        }
        positional = (stacks, outer, microbatches)
        keywords = {
            "layer_specs": {k: specs[k] for k in self.stacked_names} if specs else None,
            "outer_specs": {k: specs[k] for k in outer} if specs else None,
            "batch_axes": self.layout.batch_axes,
            "length_axes": self.layout.length_axes,
            "owned_axes": self.moe.expert_axes if self.moe is not None else (),
            "pipe_axis": self.pipe_axis,
        }
        return positional, keywords


def _stages(
    graphdef: nnx.GraphDef,
    abstract_params: PyTree,
    pipeline: PipelinePlan,
    mesh: jax.sharding.Mesh,
    shard: ActivationSharding | None,
    param_specs: PyTree | None,
    attention: AttentionPlan | None,
) -> _Stages:
    layout, local_attention = _stage_layout(shard, mesh, attention)
    kwargs = {}
    if shard is not None:
        kwargs["shard"] = ActivationSharding(without_axes(shard.rules, layout.token_axes), mesh)
    layer_kwargs = {**kwargs, "attention": local_attention}
    stacked_names = ("layers", "moe") if "moe" in abstract_params else ("layers",)
    merged = _merger(graphdef, abstract_params)
    fns = _dense_stage_functions(merged, layout, kwargs, layer_kwargs)
    moe = None
    if "moe" in abstract_params:
        moe = MoEStages(merged(), abstract_params["moe"], layout.token_axes, mesh, shard)
        fns = moe.functions(fns, merged, layout.positions, layer_kwargs)
    m = pipeline.schedule.microbatches
    return _Stages(fns, layout, moe, stacked_names, m, mesh, shard, param_specs, pipeline.axis)


def make_pipeline_grads(
    graphdef: nnx.GraphDef,
    abstract_params: PyTree,
    pipeline: PipelinePlan,
    mesh: jax.sharding.Mesh,
    shard: ActivationSharding | None,
    param_specs: PyTree | None = None,
    attention: AttentionPlan | None = None,
    reduce_dtype: str | None = None,
) -> Callable[[PyTree, dict], tuple[jax.Array, PyTree, dict]]:
    """``grads(params, batch) -> (loss, grads, metrics)`` for the transformer's params (pure dict with ``layers``).

    The same contract as ``shardlib.training.step.make_grads_fn``: ``loss`` the
    cross-entropy, the gradients those of the objective (with a mixture of
    experts, plus each microbatch's load-balancing and z-losses), ``metrics``
    the model's (MoE: ``moe_aux_loss``, ``moe_z_loss``, ``moe_dropped_fraction``,
    means over the microbatches; {} for a dense model).

    ``param_specs``: each parameter's PartitionSpec (from the rules); the batch
    axes and the sequence axis of ``shard``'s rules become manual inside the
    pipeline, so each stage runs on its own rows and its own block of every
    sequence: ``attention.local`` (ring or all-gather attention over ``seq``,
    in ``attention.order``'s layout), the rotary positions of its block, the
    experts' all-to-all (``experts.dispatch_in_manual_region``), the loss on
    its block. Without ``shard`` and ``param_specs`` (one device), parameters
    are ``P("pipe")`` for the layers and replicated otherwise. ``reduce_dtype``: what the
    gradients' reductions over the token axes carry (None: the parameters' dtype).
    """
    stages = _stages(graphdef, abstract_params, pipeline, mesh, shard, param_specs, attention)

    def grads_fn(params, batch):
        positional, keywords = stages.arguments(params, batch)
        loss, stack_grads, outer_grads, stats = pipeline_loss_and_grads(
            pipeline.table,
            stages.fns,
            *positional,
            mesh,
            pipeline.branching,
            **keywords,
            recompute=pipeline.recompute,
            reduce_dtype=reduce_dtype,
        )
        grads = {**outer_grads, **stack_grads}
        if param_specs is not None:  # the shard_map's out_specs name only its manual axes
            grads = jax.tree.map(
                lambda g, spec: jax.lax.with_sharding_constraint(g, NamedSharding(mesh, spec)), grads, param_specs
            )
        moe = stages.moe
        metrics = moe.metrics(stats, stages.microbatches, batch["inputs"].shape) if moe is not None else {}
        return loss, grads, metrics

    return grads_fn


def make_pipeline_loss(
    graphdef: nnx.GraphDef,
    abstract_params: PyTree,
    pipeline: PipelinePlan,
    mesh: jax.sharding.Mesh,
    shard: ActivationSharding | None,
    param_specs: PyTree | None = None,
    attention: AttentionPlan | None = None,
) -> Callable[[PyTree, dict], jax.Array]:
    """``loss(params, batch) -> the cross-entropy``, through ``pipeline.eval_table``: the eval step of
    a pipelined run. Each stage runs its own layers (stored, sharded over ``pipe``, as the train step
    has them) on its own rows and sequence blocks, and only stage activations cross ``pipe``. The
    arguments are ``make_pipeline_grads``'s; the loss is the train step's on the same batch (an MoE
    model's capacity and dropping per microbatch, as there)."""
    stages = _stages(graphdef, abstract_params, pipeline, mesh, shard, param_specs, attention)

    def loss_fn(params, batch):
        positional, keywords = stages.arguments(params, batch)
        loss, _ = pipeline_loss(pipeline.eval_table, stages.fns, *positional, mesh, pipeline.branching, **keywords)
        return loss

    return loss_fn
