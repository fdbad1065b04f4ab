"""The jitted training and evaluation steps.

One optimizer step = forward and backward over ``grad_accum`` microbatches
(a ``lax.scan`` inside the same jit), gradient averaging, clipping and AdamW.
Shardings are explicit on the way in and out, and the old state is donated,
so parameters and optimizer state are updated in place on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.attention import AttentionPlan
from shardlib.sharding import ActivationSharding
from shardlib.train_state import StateShardings

PyTree = Any
Batch = dict[str, jax.Array]  # {"inputs": [B, L] int32, "targets": [B, L] int32}


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32."""
    logprobs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    picked_BxL = jnp.take_along_axis(logprobs, targets_BxL[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked_BxL)


def make_loss_fn(
    graphdef: nnx.GraphDef,
    shard: ActivationSharding | None,
    attention: AttentionPlan | None = None,
    *,
    with_metrics: bool = False,
) -> Callable:
    """``loss(params, inputs_BxL, targets_BxL) -> scalar``: the mean cross-entropy.

    ``with_metrics``: returns ``(objective, metrics)`` instead, the objective
    adding the model's extra losses (``Transformer.forward``) and metrics
    holding ``loss`` (the cross-entropy) and the model's metrics.

    ``attention`` (``shardlib.attention``) supplies the attention function and
    may reorder every sequence (zig-zag for ring attention): tokens, targets
    and rotary positions are permuted alike, and the loss, a mean over
    tokens, is unchanged.
    """

    def loss_fn(params, inputs_BxL, targets_BxL):
        model = nnx.merge(graphdef, params)
        kwargs = {"shard": shard} if shard is not None else {}
        if attention is not None:
            kwargs["attention"] = attention.fn
            if attention.order is not None:
                order_L = jnp.asarray(attention.order)
                inputs_BxL, targets_BxL = inputs_BxL[:, order_L], targets_BxL[:, order_L]
                kwargs["positions_BxL"] = jnp.broadcast_to(order_L, inputs_BxL.shape)
        if not with_metrics:
            return cross_entropy(model(inputs_BxL, **kwargs), targets_BxL)
        logits_BxLxV, extra_loss, metrics = model.forward(inputs_BxL, **kwargs)
        loss = cross_entropy(logits_BxLxV, targets_BxL)
        if not metrics:  # dense: exactly the cross-entropy
            return loss, {"loss": loss}
        return loss + extra_loss, {"loss": loss, **metrics}

    return loss_fn


def split_microbatches(x_BxL: jax.Array, count: int, shard: ActivationSharding | None) -> jax.Array:
    """[B, L] -> [count, B/count, L], microbatch i = rows i, i+count, ...

    Strided rows keep each device's rows on that device: a contiguous split
    would put whole microbatches on a subset of the data-parallel devices.
    """
    b, length = x_BxL.shape
    x_CxMxL = x_BxL.reshape(b // count, count, length).swapaxes(0, 1)
    if shard is not None:
        x_CxMxL = shard(x_CxMxL, (None, "batch", "length"))
    return x_CxMxL


def loss_and_grads(loss_fn: Callable, params: PyTree, batch: Batch, grad_accum: int, shard=None, has_aux=False):
    """Mean loss and gradients over the batch, accumulated over microbatches.

    Every microbatch has the same number of tokens, so the mean of the
    microbatch means equals the full-batch mean. With ``has_aux`` the loss
    function returns (loss, metrics) and the result is ((loss, metrics), grads),
    metrics averaged over microbatches too.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if grad_accum == 1:
        return grad_fn(params, batch["inputs"], batch["targets"])
    inputs = split_microbatches(batch["inputs"], grad_accum, shard)
    targets = split_microbatches(batch["targets"], grad_accum, shard)

    def accumulate(carry, micro):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, *micro)
        return (jax.tree.map(jnp.add, loss_sum, loss), jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    loss_zeros = jnp.zeros((), jnp.float32)
    if has_aux:  # (loss, metrics): zeros of whatever the loss function returns
        shapes = jax.eval_shape(loss_fn, params, inputs[0], targets[0])
        loss_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (loss_zeros, zeros), (inputs, targets))
    return jax.tree.map(lambda v: v / grad_accum, loss_sum), jax.tree.map(lambda g: g / grad_accum, grad_sum)


def make_grads_fn(
    graphdef: nnx.GraphDef,
    shard: ActivationSharding | None,
    grad_accum: int = 1,
    attention: AttentionPlan | None = None,
) -> Callable:
    """``grads(params, batch) -> (loss, grads, metrics)`` without a pipeline (see ``shardlib.pipeline.step``).

    The gradients are those of the training objective: cross-entropy plus the
    model's extra losses (MoE load-balancing and z-losses); ``loss`` is the
    cross-entropy, ``metrics`` the model's own (empty for a dense model).
    """
    loss_fn = make_loss_fn(graphdef, shard, attention, with_metrics=True)

    def grads_fn(params, batch):
        (_, metrics), grads = loss_and_grads(loss_fn, params, batch, grad_accum, shard, has_aux=True)
        metrics = dict(metrics)
        return metrics.pop("loss"), grads, metrics

    return grads_fn


def make_train_step(
    grads_fn: Callable[[PyTree, Batch], tuple[jax.Array, PyTree, dict[str, jax.Array]]],
    tx: optax.GradientTransformation,
    shardings: StateShardings,
    batch_sharding: NamedSharding,
    compression=None,
) -> Callable[[PyTree, PyTree, Batch], tuple[PyTree, PyTree, dict[str, jax.Array]]]:
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    ``grads_fn`` gives the loss, gradients and the model's metrics (plain,
    accumulated or pipelined: ``make_grads_fn``, ``make_pipeline_grads``);
    params / opt_state arrive and leave with ``shardings`` and are donated;
    batch arrays carry ``batch_sharding``; metrics (loss, grad_norm and the
    model's) are replicated scalars.

    ``compression`` (a ``shardlib.compression.GradCompression``) replaces
    ``grads_fn``: per-shard gradients reduced compressed over the batch axes,
    with the error-feedback residuals it keeps in ``opt_state``.
    """

    def step(params, opt_state, batch):
        if compression is None:
            loss, grads, extra = grads_fn(params, batch)
        else:
            loss, grads, opt_state = compression.loss_and_grads(params, opt_state, batch)
            extra = {}
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **extra}

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    return jax.jit(
        step,
        in_shardings=(shardings.params, shardings.opt_state, batch_shardings),
        out_shardings=(shardings.params, shardings.opt_state, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    shardings: StateShardings,
    batch_sharding: NamedSharding,
    shard: ActivationSharding,
    attention: AttentionPlan | None = None,
) -> Callable[[PyTree, Batch], jax.Array]:
    """``eval(params, batch) -> loss``, jitted; nothing is donated."""
    loss_fn = make_loss_fn(graphdef, shard, attention)
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(
        lambda params, batch: loss_fn(params, batch["inputs"], batch["targets"]),
        in_shardings=(shardings.params, {"inputs": batch_sharding, "targets": batch_sharding}),
        out_shardings=replicated,
    )
