"""The jitted training and evaluation steps, both built from one ``ParallelPlan``.

One optimizer step = forward and backward over ``grad_accum`` microbatches
(``shardlib.parallel.accumulation``), or through the pipeline's schedule, or per data
shard with a compressed reduction; then clipping and AdamW. Shardings are
explicit on the way in and out, and the old state is donated, so parameters
and optimizer state are updated in place on every device.

The eval step runs the network the train step trains: the same attention,
expert dispatch and token order; with a pipeline, through the schedule's
forward-only table, so each stage runs only the layers it stores.

DiLoCo's steps, built on the same loss and gradients, are
``shardlib.training.diloco_steps``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.core.sharding import ActivationSharding
from shardlib.models.layers import WEIGHT_USES, WeightUse, cross_entropy, use_weight
from shardlib.models.pipeline_stages import make_pipeline_grads, make_pipeline_loss
from shardlib.models.transformer import WEIGHT_PARAMS
from shardlib.parallel.accumulation import Batch, loss_and_grads
from shardlib.parallel.compression import GradCompression, make_grad_compression
from shardlib.parallel.reduction import ReducedWeightUse, reduce_deferred_params, reduced_weight_use, use_specs
from shardlib.training.parallel_plan import ParallelPlan
from shardlib.training.train_state import AbstractModel, StateShardings

PyTree = Any
GradsFn = Callable[[PyTree, Batch], tuple[jax.Array, PyTree, dict[str, jax.Array]]]

__all__ = [
    "cross_entropy",
    "make_eval_step",
    "make_grads_fn",
    "make_loss_fn",
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
            model.graphdef,
            model.params,
            plan.pipeline,
            plan.mesh,
            plan.shard,
            specs,
            plan.attention,
            reduce_dtype=plan.precision.reduce,
        )
    # With accumulation, each use's all-reduce waits for the last microbatch: one per step, not per microbatch.
    use = weight_use(plan, shardings, deferred=plan.grad_accum > 1)
    loss_fn = make_loss_fn(model.graphdef, plan, with_metrics=True, use=use)

    def grads_fn(params, batch):
        (_, metrics), grads = loss_and_grads(loss_fn, params, batch, plan.grad_accum, plan.shard, has_aux=True)
        if isinstance(use, ReducedWeightUse) and use.deferred:
            grads = _reduce_deferred_grads(grads, use, shardings)
        metrics = dict(metrics)
        return metrics.pop("loss"), grads, metrics

    return grads_fn


def _reduce_deferred_grads(grads: PyTree, use: ReducedWeightUse, shardings: StateShardings) -> PyTree:
    """``grads`` with the leaves ``use`` applies (each device's partial sums until now) reduced once."""
    paths = {WEIGHT_PARAMS[name] for name in use.weight_specs}
    return reduce_deferred_params(grads, shardings.params, sorted(paths), use)


def weight_use(plan: ParallelPlan, shardings: StateShardings, *, deferred: bool = False) -> WeightUse:
    """How the train step applies the weights: the public ``reduced_weight_use`` when the plan reduces per use.

    Every weight of ``WEIGHT_PARAMS`` the model has, with its parameter's spec (a stacked
    layer's without the layer dimension, ``use_specs``); the default ``use_weight`` when the plan
    leaves the reduction elsewhere (``reduced_weight_use`` gives the same plain use when no token
    axis splits anything).
    """
    if not plan.reduce_per_use:
        return use_weight
    specs = use_specs(shardings.params, WEIGHT_PARAMS, stacked=("layers",))
    return reduced_weight_use(
        plan.shard,
        WEIGHT_USES,
        specs,
        lookups=("embedding",),
        deferred=deferred,
        reduce_dtype=plan.precision.reduce,
        ordered=_ordered_uses(plan, specs),
    )


def _ordered_uses(plan: ParallelPlan, specs: dict) -> list[str]:
    """The uses whose backward gathers only after reducing (``ReducedWeightUse``'s ``ordered``): the layers'
    on XLA:CPU, which runs collectives in turn (nothing to overlap, so it takes the lower peak)."""
    if plan.mesh.devices.flat[0].platform != "cpu":
        return []
    return [name for name in specs if WEIGHT_PARAMS[name][0] == "layers"]


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
    ``data_replica`` is resharded through full replication. A pipelined plan evaluates through
    its executor (``make_pipeline_loss``): run in sequence, the layer stack sharded over ``pipe``
    would be all-gathered onto every device.
    """
    if plan.pipeline is not None:
        specs = jax.tree.map(lambda s: s.spec, shardings.params)

        def evaluate(params, b):
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
            pipelined = make_pipeline_loss(
                graphdef, abstract, plan.pipeline, plan.mesh, plan.shard, specs, plan.attention
            )
            return pipelined(params, b)
    else:
        loss_fn = make_loss_fn(graphdef, plan, use=weight_use(plan, shardings))

        def evaluate(params, b):
            return loss_fn(params, b["inputs"], b["targets"])

    batch = plan.batch_sharding
    return jax.jit(
        evaluate,
        in_shardings=(shardings.params, {"inputs": batch, "targets": batch}),
        out_shardings=NamedSharding(plan.mesh, PartitionSpec()),
    )
