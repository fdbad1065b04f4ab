"""Gradient accumulation: the mean loss and gradients of a batch taken in microbatches.

A strategy like the others: it takes a loss function and arrays and returns
the loss and gradients, so the plain step, the compressed step (per data
shard) and the pipeline (which splits its own microbatches) share it. One
``lax.scan`` inside the caller's jit; every microbatch has the same number of
tokens, so the mean of microbatch means is the full-batch mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shardlib.core.sharding import ActivationSharding

PyTree = Any
Batch = dict[str, jax.Array]  # {"inputs": [B, L] int32, "targets": [B, L] int32}


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
    """Mean loss and gradients over the batch, accumulated over ``grad_accum`` microbatches.

    ``loss_fn(params, inputs_BxL, targets_BxL)``. With ``has_aux`` it returns
    (loss, metrics) and the result is ((loss, metrics), grads), metrics
    averaged over microbatches too. Gradients come out sharded like ``params``.
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
