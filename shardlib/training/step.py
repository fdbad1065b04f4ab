"""The jitted training and evaluation steps, both built from one ``ParallelPlan``.

One optimizer step = forward and backward over ``grad_accum`` microbatches
(``shardlib.parallel.accumulation``), or through the pipeline's schedule, or per data
shard with a compressed reduction; then clipping and AdamW. Shardings are
explicit on the way in and out, and the old state is donated, so parameters
and optimizer state are updated in place on every device.

The eval step runs the network the train step trains: the same attention,
expert dispatch and token order, and the layers in their logical order
whatever layout the pipeline stores them in.

DiLoCo and local SGD (``make_diloco_steps``) replace the train step by two:
the inner step, every replica group's own optimizer step with no collective
over the replica axes, and the outer step, run after every H-th inner step,
whose one all-reduce averages the pseudo-gradient (``shardlib.parallel.diloco``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models.layers import WEIGHT_USES, WeightUse, cross_entropy, use_weight
from models.transformer import WEIGHT_PARAMS
from shardlib.core.sharding import ActivationSharding, is_logical_axes
from shardlib.parallel.accumulation import Batch, loss_and_grads
from shardlib.parallel.compression import GradCompression, make_grad_compression
from shardlib.parallel.diloco import outer_update, replica_mean, replica_metrics, split_replicas
from shardlib.parallel.diloco_streaming import (
    Fragment,
    apply_fragment,
    fragment_pseudo_gradient,
    fragment_update,
    split_fragments,
)
from shardlib.parallel.pipeline.stages import make_pipeline_grads
from shardlib.parallel.reduction import ReducedWeightUse
from shardlib.training.parallel_plan import ParallelPlan
from shardlib.training.train_state import AbstractModel, StateShardings

PyTree = Any
GradsFn = Callable[[PyTree, Batch], tuple[jax.Array, PyTree, dict[str, jax.Array]]]

__all__ = [
    "DiLoCoSteps",
    "cross_entropy",
    "make_diloco_steps",
    "make_eval_step",
    "make_grads_fn",
    "make_loss_fn",
    "make_outer_compression",
    "make_train_step",
]


def make_loss_fn(
    graphdef: nnx.GraphDef,
    plan: ParallelPlan,
    *,
    shard: ActivationSharding | None = None,
    with_metrics: bool = False,
    use: WeightUse = use_weight,
) -> Callable:
    """``loss(params, inputs_BxL, targets_BxL) -> scalar``: the mean cross-entropy, the model run in sequence.

    The cross-entropy is ``Transformer.loss`` of the last layer's output: chunked along the
    sequence when the model has ``loss_chunk`` (never the whole [B, L, V]
    logits), so the train and eval steps take the same loss.

    ``with_metrics``: returns ``(objective, metrics)`` instead, the objective
    adding the model's extra losses (``Transformer.forward``) and metrics
    holding ``loss`` (the cross-entropy) and the model's metrics.

    The plan supplies the attention function and may reorder every sequence
    (zig-zag for ring attention): tokens, targets and rotary positions are
    permuted alike, and the loss, a mean over tokens, is unchanged. ``shard``
    replaces the plan's activation constraints (per-shard rules under vmap);
    ``use`` applies the weights (``weight_use``: reduced per use).
    """
    order = plan.attention.order

    def loss_fn(params, inputs_BxL, targets_BxL):
        model = nnx.merge(graphdef, plan.sequential_params(params))
        kwargs = plan.model_kwargs(shard)
        if order is not None:
            order_L = jnp.asarray(order)
            inputs_BxL, targets_BxL = inputs_BxL[:, order_L], targets_BxL[:, order_L]
            kwargs["positions_BxL"] = jnp.broadcast_to(order_L, inputs_BxL.shape)
        x_BxLxD, extra_loss, metrics = model.hidden(inputs_BxL, **kwargs, use=use)
        loss = model.loss(x_BxLxD, targets_BxL, shard=kwargs["shard"], use=use)  # chunked with model.loss_chunk
        if not with_metrics:
            return loss
        if not metrics:  # dense: exactly the cross-entropy
            return loss, {"loss": loss}
        return loss + extra_loss, {"loss": loss, **metrics}

    return loss_fn


def make_grads_fn(model: AbstractModel, plan: ParallelPlan, shardings: StateShardings) -> GradsFn:
    """``grads(params, batch) -> (loss, grads, metrics)``: accumulated, or through the plan's pipeline.

    The gradients are those of the training objective: cross-entropy plus the
    model's extra losses (MoE load-balancing and z-losses); ``loss`` is the
    cross-entropy, ``metrics`` the model's own (empty for a dense model).
    """
    if plan.pipeline is not None:
        specs = jax.tree.map(lambda s: s.spec, shardings.params)
        return make_pipeline_grads(
            model.graphdef, model.params, plan.pipeline, plan.mesh, plan.shard, specs, plan.attention
        )
    loss_fn = make_loss_fn(model.graphdef, plan, with_metrics=True, use=weight_use(plan, shardings))

    def grads_fn(params, batch):
        (_, metrics), grads = loss_and_grads(loss_fn, params, batch, plan.grad_accum, plan.shard, has_aux=True)
        metrics = dict(metrics)
        return metrics.pop("loss"), grads, metrics

    return grads_fn


def weight_use(plan: ParallelPlan, shardings: StateShardings) -> WeightUse:
    """How the train step applies the weights: reducing each use's gradient itself when the plan says so.

    ``ReducedWeightUse`` over the plan's token axes, every weight of
    ``WEIGHT_PARAMS`` the model has with its parameter's spec (a stacked
    layer's without the layer dimension); the default ``use_weight`` when the
    plan leaves the reduction elsewhere or no token axis splits anything.
    """
    rows, positions = plan.token_axes
    if not plan.reduce_per_use or not (rows or positions):
        return use_weight
    specs = {}
    for name, path in WEIGHT_PARAMS.items():
        node = shardings.params
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, NamedSharding):  # absent: tied embeddings' unembed, MoE-only MLPs
            specs[name] = PartitionSpec(*tuple(node.spec)[1:]) if path[0] == "layers" else node.spec
    return ReducedWeightUse(plan.mesh, WEIGHT_USES, specs, plan.shard.spec, rows, positions)


def make_compression(model: AbstractModel, plan: ParallelPlan, shardings: StateShardings) -> GradCompression | None:
    """The plan's compressed gradient reduction, its per-shard loss the run's own (attention included)."""
    return make_grad_compression(
        plan.compression,
        make_loss=lambda inner: make_loss_fn(model.graphdef, plan, shard=inner),
        params=model.params,
        param_shardings=shardings.params,
        rules=plan.rules,
        mesh=plan.mesh,
        batch_spec=plan.batch_sharding.spec,
        grad_accum=plan.grad_accum,
    )


def make_train_step(
    grads_fn: GradsFn,
    tx: optax.GradientTransformation,
    shardings: StateShardings,
    batch_sharding: NamedSharding,
    compression: GradCompression | None = None,
) -> Callable[[PyTree, PyTree, Batch], tuple[PyTree, PyTree, dict[str, jax.Array]]]:
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    ``grads_fn`` gives the loss, gradients and the model's metrics
    (``make_grads_fn``); params / opt_state arrive and leave with
    ``shardings`` and are donated; batch arrays carry ``batch_sharding``;
    metrics (loss, grad_norm, the updated parameters' norm and the model's) are replicated scalars.

    ``compression`` (``make_compression``) replaces ``grads_fn``: per-shard
    gradients reduced compressed over the batch axes, with the error-feedback
    residuals it keeps in ``opt_state``.
    """

    def step(params, opt_state, batch):
        if compression is None:
            loss, grads, extra = grads_fn(params, batch)
        else:
            loss, grads, opt_state = compression.loss_and_grads(params, opt_state, batch)
            extra = {}
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # param_norm: the state this update made, checked before it can be saved (faults.NanGuard).
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
        return params, opt_state, {**metrics, **extra}

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    return jax.jit(
        step,
        in_shardings=(shardings.params, shardings.opt_state, batch_shardings),
        out_shardings=(shardings.params, shardings.opt_state, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(
    graphdef: nnx.GraphDef, shardings: StateShardings, plan: ParallelPlan
) -> Callable[[PyTree, Batch], jax.Array]:
    """``eval(params, batch) -> loss`` (the cross-entropy, replicated scalar), jitted; nothing is donated.

    The weights are applied as the train step applies them (``weight_use``), so the forward
    passes are partitioned alike: left to XLA, an FSDP table's lookup on a mesh with
    ``data_replica`` is resharded through full replication.
    """
    loss_fn = make_loss_fn(graphdef, plan, use=weight_use(plan, shardings))
    batch = plan.batch_sharding
    return jax.jit(
        lambda params, b: loss_fn(params, b["inputs"], b["targets"]),
        in_shardings=(shardings.params, {"inputs": batch, "targets": batch}),
        out_shardings=NamedSharding(plan.mesh, PartitionSpec()),
    )


def make_outer_compression(
    model: AbstractModel, plan: ParallelPlan, replica_param_shardings: PyTree, fragments: tuple[Fragment, ...] = ()
) -> GradCompression | None:
    """DiLoCo's compressed pseudo-gradient all-reduce over the replica axes, or None (``outer.compression: none``).

    The gradient compression's own reduction, its "shards" the replicas:
    ``GradCompression.reduce`` takes [R, *param] arrays sharded over the
    replica axes, as the pseudo-gradient is; only ``reduce`` and the
    error-feedback state are used (no loss runs through it). With ``fragments`` (streaming),
    each fragment is a segment of its own (``reduce_segment``) with its own residuals.
    """
    settings = plan.outer.settings
    axes = settings.replica_axes
    return make_grad_compression(
        settings.compression,
        make_loss=lambda _: None,
        params=model.params,
        param_shardings=replica_param_shardings,
        rules=plan.outer.plan.rules,
        mesh=plan.mesh,
        batch_spec=PartitionSpec(axes[0] if len(axes) == 1 else axes),
        grad_accum=1,
        segments=tuple(f.rows for f in fragments) if len(fragments) > 1 else None,
    )


@dataclasses.dataclass(frozen=True)
class DiLoCoSteps:
    """The jitted steps of a DiLoCo or local SGD run (``make_diloco_steps``).

    inner(params_R, opt_state, batch) -> (params_R, opt_state, metrics_R): every metric [R], per replica.
    outer[f](params_R, opt_state) -> (params_R, opt_state): the outer step of fragment f, after the inner
      steps ``OuterSettings.fragment_due`` names (one fragment, the whole network, unless streaming).
    overlapped[f](params_R, opt_state, batch) -> as inner: with ``outer.overlap_steps: 1``, the inner
      step that follows those, with fragment f's outer step in it: the all-reduce of the pseudo-gradient
      the step's input holds, independent of the inner step's compute (so XLA may run them at once),
      applied after it. () otherwise, and ``outer`` is then what the loop never runs.
    metrics([metrics_R, ...]) -> the steps' replicated scalars (``diloco.replica_metrics``), in one program.
    eval(params_R, batch) -> loss: the held-out loss of the replicas' mean.
    grads(params_R, batch) -> (loss_R, grads_R): every replica's own, for tests and tools.
    """

    inner: Callable
    outer: tuple[Callable, ...]
    overlapped: tuple[Callable, ...]
    metrics: Callable
    eval: Callable
    grads: Callable


def model_fragments(model: AbstractModel, count: int) -> tuple[Fragment, ...]:
    """Streaming DiLoCo's fragments of ``model``'s parameters: the layer stack cut in ``count``
    (``diloco.split_fragments``; stacked leaves are those whose first logical axis is ``layers``)."""
    shapes = [tuple(p.shape) for p in jax.tree.leaves(model.params)]
    axes = jax.tree.leaves(model.logical_axes, is_leaf=is_logical_axes)
    return split_fragments(shapes, [bool(a) and a[0] == "layers" for a in axes], count)


def make_diloco_steps(
    model: AbstractModel,
    grads_fn: GradsFn,
    tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    shardings: StateShardings,
    plan: ParallelPlan,
    compression: GradCompression | None = None,
) -> DiLoCoSteps:
    """The inner, outer, metrics and eval steps of ``plan.outer``.

    ``grads_fn``: one replica's (``make_grads_fn`` of ``plan.outer.plan``),
    run under vmap over the replica axes on [R, B/R, L] rows; ``tx``:
    ``diloco.diloco_optimizer`` (the inner optimizer per replica);
    ``shardings``: params_R and the DiLoCo state's. Both steps donate the state.

    The inner step's metrics stay per replica ([R], sharded over the replica
    axes): a scalar mean in the step would be an all-reduce over the replica
    axes at every step; ``metrics`` reduces them when the host reads them
    (log steps and saves), in a separate program.
    """
    replica = plan.outer
    axes = replica.settings.replica_axes
    spmd = axes[0] if len(axes) == 1 else axes
    mesh = plan.mesh

    def replica_grads(params_R, batch):
        rows = {k: split_replicas(v, replica.batch_axes, axes, mesh) for k, v in batch.items()}
        return jax.vmap(grads_fn, spmd_axis_name=spmd)(params_R, rows)

    def inner(params_R, opt_state, batch):
        loss_R, grads_R, extra_R = replica_grads(params_R, batch)
        updates_R, opt_state = tx.update(grads_R, opt_state, params_R)
        params_R = optax.apply_updates(params_R, updates_R)
        norm_R = jax.vmap(optax.tree.norm, spmd_axis_name=spmd)
        metrics_R = {"loss": loss_R, "grad_norm": norm_R(grads_R), "param_norm": norm_R(params_R), **extra_R}
        return params_R, opt_state, metrics_R

    settings = replica.settings

    def outer(params_R, opt_state):
        reduce = None if compression is None else compression.reduce
        return outer_update(params_R, opt_state, outer_tx, reduce, settings.moments)

    def reduce_of(k: int):
        return None if compression is None else functools.partial(compression.reduce_segment, k)

    def fragment_outer(k: int, fragment: Fragment):
        def step(params_R, opt_state):
            return fragment_update(
                params_R, opt_state, outer_tx, fragment, reduce_of(k), settings.mixing, settings.moments
            )

        return step

    def overlapped_step(k: int, fragment: Fragment):
        def step(params_R, opt_state, batch):
            delta, opt_state = fragment_pseudo_gradient(params_R, opt_state, fragment, reduce_of(k))
            params_R, opt_state, metrics_R = inner(params_R, opt_state, batch)
            params_R, opt_state = apply_fragment(params_R, opt_state, outer_tx, fragment, delta, settings.mixing)
            return params_R, opt_state, metrics_R

        return step

    fragments = model_fragments(model, settings.fragments)
    whole = settings.fragments == 1 and not settings.mixing  # DiLoCo's own outer step
    outers = [outer] if whole else [fragment_outer(k, f) for k, f in enumerate(fragments)]
    overlapped = [overlapped_step(k, f) for k, f in enumerate(fragments)] if settings.overlap else []

    state = (shardings.params, shardings.opt_state)
    batch = {"inputs": plan.batch_sharding, "targets": plan.batch_sharding}
    replicated = NamedSharding(mesh, PartitionSpec())
    loss_fn = make_loss_fn(model.graphdef, plan)  # the whole mesh's rules: the mean is one network
    per_replica_metrics = NamedSharding(mesh, PartitionSpec(spmd))

    def stepping(fn):
        return jax.jit(
            fn, in_shardings=(*state, batch), out_shardings=(*state, per_replica_metrics), donate_argnums=(0, 1)
        )

    return DiLoCoSteps(
        inner=stepping(inner),
        outer=tuple(jax.jit(o, in_shardings=state, out_shardings=state, donate_argnums=(0, 1)) for o in outers),
        overlapped=tuple(stepping(o) for o in overlapped),
        # One program for all the steps the host fetches at once: one per step, queued, let XLA:CPU's
        # emulated devices drift apart and stall in their all-reduces (loop.waits_for_each_step).
        metrics=jax.jit(lambda steps: [replica_metrics(m) for m in steps], out_shardings=replicated),
        eval=jax.jit(
            lambda params_R, b: loss_fn(replica_mean(params_R), b["inputs"], b["targets"]),
            in_shardings=(shardings.params, batch),
            out_shardings=replicated,
        ),
        grads=jax.jit(lambda params_R, b: replica_grads(params_R, b)[:2]),
    )
