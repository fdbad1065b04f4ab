"""Mixture-of-experts routing without a mesh: top-k router, capacity, capacity-padded buffers, combine.

Pure functions of plain arrays, for any expert function: nothing here names a
mesh axis or knows what an expert computes. ``shardlib.parallel.experts`` runs
the same steps with the buffers sent to the experts' devices and back.

Semantics (identical on every mesh where no dispatch group is split):

* Router: softmax over all E experts of float32 logits; the k largest
  probabilities pick the experts. With k > 1 the k weights are renormalised
  to sum to 1 (Mixtral); with k = 1 the weight is the raw probability
  (Switch), so the main loss still trains the router.
* Capacity: tokens are dispatched in groups, a group being the tokens of one
  row (sequence) that one device holds (the whole row unless the length axis
  is sharded). Each expert takes at most C = ceil(capacity_factor * T * k / E)
  (token, choice) pairs of a group of T tokens, in priority order: every
  token's first choice, in sequence order, before any second choice (GShard).
  A pair past C is dropped: it contributes nothing.
* Load-balancing loss (Switch / GShard): E * sum_e f_e * P_e, f_e the fraction
  of (token, choice) pairs routed to e before dropping, P_e the mean router
  probability of e, both over all tokens of the batch; 1 when uniform.
* Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.

An expert function is ``expert_fn(expert_weights, x_ExNxD) -> y_ExNxD``: any
pytree of weights stacked over a leading dimension of E experts, applied
expert by expert to N tokens each (the capacity slots of every group).

Shape suffixes: B batch, L length, D model width, E experts, R routes (the
top-k choices), C capacity, G groups (rows) held by one device, T tokens per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
ExpertFn = Callable[[PyTree, jax.Array], jax.Array]
"""``expert_fn(expert_weights, x_ExNxD) -> y_ExNxD``: every expert on its own N tokens."""


class Routing(NamedTuple):
    """The router's decision for every token, and its losses over the batch."""

    expert_BxLxR: jax.Array  # int32 expert ids, best first
    weight_BxLxR: jax.Array  # float32 combine weights
    aux_loss: jax.Array  # scalar load-balancing loss
    z_loss: jax.Array  # scalar router z-loss


class MoEStats(NamedTuple):
    """One MoE layer's statistics (float32 scalars; stacked over layers by a scan).

    Add ``aux_weight * aux_loss + z_weight * z_loss`` to the objective; ``dropped``
    counts the (token, choice) pairs of the whole batch past capacity.
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    dropped: jax.Array


TokenMean = Callable[[jax.Array], jax.Array]
"""``mean(x_BxLx___) -> x___``: the mean of a per-token statistic over every token of the batch.

The default, ``mean_over_tokens``, averages the array it is given; a caller
holding only its own block of the batch (inside a ``shard_map`` manual over
the token axes) passes one that also averages over the other blocks
(``shardlib.parallel.experts.token_mean_in_manual_region``).
"""

ExpertDispatch = Callable[..., tuple[jax.Array, jax.Array]]
"""``dispatch(x_BxLxD, expert_BxLxR, weight_BxLxR, expert_fn, expert_weights, *, capacity_factor,
weight_axes=None) -> (y_BxLxD, dropped)``.

Runs every (token, choice) pair through its expert within capacity and sums
the weighted outputs per token; ``dropped`` is the number of pairs past
capacity (float32 scalar, whole batch). ``weight_axes``: see
``shardlib.parallel.experts.expert_parallel_dispatch``.
"""


def mean_over_tokens(x_BxLx___: jax.Array) -> jax.Array:
    """The default ``TokenMean``: the mean over the batch and length dimensions."""
    return jnp.mean(x_BxLx___, axis=(0, 1))


def capacity(tokens_per_group: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group: ceil(capacity_factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / n_experts))


def _top_k(probs_BxLxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` for small k as k masked max/argmax passes.

    Reductions along the expert dim partition over sharded tokens as they are;
    XLA's partitioner all-gathers the whole [B, L, E] input of a TopK instead.
    """
    values, indices = [], []
    masked_BxLxE = probs_BxLxE
    for _ in range(k):
        index_BxL = jnp.argmax(masked_BxLxE, axis=-1)
        values.append(jnp.max(masked_BxLxE, axis=-1))
        indices.append(index_BxL)
        taken_BxLxE = jax.nn.one_hot(index_BxL, probs_BxLxE.shape[-1], dtype=jnp.bool_)
        masked_BxLxE = jnp.where(taken_BxLxE, -jnp.inf, masked_BxLxE)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def check_top_k(top_k: int, n_experts: int) -> None:
    """Refuses a ``top_k`` outside [1, n_experts], naming both."""
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({n_experts})")


def router_top_k(logits_BxLxE: jax.Array, top_k: int, token_mean: TokenMean = mean_over_tokens) -> Routing:
    """Top-k routing of float32 ``logits_BxLxE``, with the load-balancing and z losses over all tokens."""
    n_experts = logits_BxLxE.shape[-1]
    check_top_k(top_k, n_experts)
    logits_BxLxE = logits_BxLxE.astype(jnp.float32)
    probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
    top_BxLxR, expert_BxLxR = _top_k(probs_BxLxE, top_k)
    weight_BxLxR = top_BxLxR / jnp.sum(top_BxLxR, axis=-1, keepdims=True) if top_k > 1 else top_BxLxR
    # f_e counts routing decisions (not differentiable); P_e carries the gradient.
    chosen_BxLxE = jnp.sum(jax.nn.one_hot(expert_BxLxR, n_experts, dtype=jnp.float32), axis=2)
    fraction_E = token_mean(chosen_BxLxE) / top_k
    mean_prob_E = token_mean(probs_BxLxE)
    aux_loss = n_experts * jnp.sum(fraction_E * mean_prob_E)
    z_loss = token_mean(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1)))
    return Routing(expert_BxLxR.astype(jnp.int32), weight_BxLxR, aux_loss, z_loss)


def expert_slots(expert_GxTxR: jax.Array, n_experts: int) -> jax.Array:
    """Position of every (token, choice) pair in its expert's buffer, per group.

    Priority: all first choices in token order, then all second choices, so
    under pressure a token loses its second expert before another token loses
    its first. Returns int32 [G, T, K]; a slot >= capacity means dropped.
    """
    g, t, k = expert_GxTxR.shape
    onehot_GxKTxE = jax.nn.one_hot(expert_GxTxR.swapaxes(1, 2).reshape(g, k * t), n_experts, dtype=jnp.int32)
    before_GxKTxE = jnp.cumsum(onehot_GxKTxE, axis=1) - onehot_GxKTxE
    slot_GxKT = jnp.sum(before_GxKTxE * onehot_GxKTxE, axis=-1)
    return slot_GxKT.reshape(g, k, t).swapaxes(1, 2)


def _buffer_index(expert_GxTxR: jax.Array, slot_GxTxR: jax.Array, n_experts: int, cap: int) -> jax.Array:
    """Flat index into an [E, G, C] buffer; dropped pairs get E*G*C, one past the end."""
    g = expert_GxTxR.shape[0]
    group_Gx1x1 = jnp.arange(g, dtype=jnp.int32)[:, None, None]
    index_GxTxR = (expert_GxTxR * g + group_Gx1x1) * cap + slot_GxTxR
    return jnp.where(slot_GxTxR < cap, index_GxTxR, n_experts * g * cap)


def dispatch_tokens(x_GxTxD: jax.Array, index_GxTxR: jax.Array, n_experts: int, cap: int) -> jax.Array:
    """Scatters each (token, choice) pair into its slot: [E, G, C, D] (empty slots are zero)."""
    g, t, d = x_GxTxD.shape
    k = index_GxTxR.shape[-1]
    rows_GTKxD = jnp.broadcast_to(x_GxTxD[:, :, None, :], (g, t, k, d)).reshape(g * t * k, d)
    buffer_ExGCxD = jnp.zeros((n_experts * g * cap, d), x_GxTxD.dtype)
    # Every live slot receives exactly one pair; out-of-range (dropped) indices are skipped.
    buffer_ExGCxD = buffer_ExGCxD.at[index_GxTxR.reshape(-1)].add(rows_GTKxD, mode="drop")
    return buffer_ExGCxD.reshape(n_experts, g, cap, d)


def combine_tokens(out_ExGxCxD: jax.Array, index_GxTxR: jax.Array, weight_GxTxR: jax.Array) -> jax.Array:
    """Gathers each pair's expert output and sums them weighted per token: [G, T, D]."""
    e, g, cap, d = out_ExGxCxD.shape
    flat_EGCxD = out_ExGxCxD.reshape(e * g * cap, d)
    picked_GxTxKxD = flat_EGCxD.at[index_GxTxR].get(mode="fill", fill_value=0)
    weighted = picked_GxTxKxD * weight_GxTxR[..., None].astype(out_ExGxCxD.dtype)
    return jnp.sum(weighted, axis=2)


def run_on_buffer(expert_fn: ExpertFn, expert_weights: PyTree, buffer_ExGxCxD: jax.Array) -> jax.Array:
    """``expert_fn`` on a capacity buffer [E, G, C, D], its slots seen as [E, G*C, D] tokens; refuses a wrong shape."""
    e, g, cap, d = buffer_ExGxCxD.shape
    out_ExNxD = expert_fn(expert_weights, buffer_ExGxCxD.reshape(e, g * cap, d))
    if getattr(out_ExNxD, "shape", None) != (e, g * cap, d):
        raise ValueError(
            f"expert_fn must map x_ExNxD {(e, g * cap, d)} to y_ExNxD of the same shape, "
            f"got {getattr(out_ExNxD, 'shape', type(out_ExNxD).__name__)}"
        )
    return out_ExNxD.reshape(e, g, cap, d)


def through_experts(
    x_GxTxD: jax.Array,
    expert_GxTxR: jax.Array,
    weight_GxTxR: jax.Array,
    n_experts: int,
    capacity_factor: float,
    run_experts: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Dispatch into capacity-padded buffers, ``run_experts``, combine: (y [G, T, D], dropped pairs).

    ``run_experts(dispatch_ExGxCxD) -> out_ExGxCxD`` runs every expert on its
    slots (here, or on the experts' devices and back: ``shardlib.parallel.experts``).
    """
    cap = capacity(x_GxTxD.shape[1], n_experts, expert_GxTxR.shape[-1], capacity_factor)
    slot_GxTxR = expert_slots(expert_GxTxR, n_experts)
    dropped = jnp.sum(slot_GxTxR >= cap).astype(jnp.float32)
    index_GxTxR = _buffer_index(expert_GxTxR, slot_GxTxR, n_experts, cap)
    out_ExGxCxD = run_experts(dispatch_tokens(x_GxTxD, index_GxTxR, n_experts, cap))
    return combine_tokens(out_ExGxCxD, index_GxTxR, weight_GxTxR), dropped


def stacked_experts(expert_weights: PyTree) -> int:
    """The experts a weight tree stacks: its leaves' common leading dimension; refuses a tree without one."""
    leaves = jax.tree_util.tree_flatten_with_path(expert_weights)[0]
    if not leaves:
        raise ValueError("expert_weights has no arrays: pass the experts' weights stacked over a leading [E] dim")
    leading = {w.shape[0] if w.ndim else None for _, w in leaves}
    if len(leading) != 1 or None in leading:
        shapes = ", ".join(f"{jax.tree_util.keystr(p) or '<root>'} {tuple(w.shape)}" for p, w in leaves)
        raise ValueError(f"expert_weights must stack every leaf over one leading experts dim, got shapes {shapes}")
    n_experts = leading.pop()
    assert n_experts is not None  # refused above
    return n_experts


def local_dispatch(
    x_BxLxD: jax.Array,
    expert_BxLxR: jax.Array,
    weight_BxLxR: jax.Array,
    expert_fn: ExpertFn,
    expert_weights: PyTree,
    *,
    capacity_factor: float,
    weight_axes: PyTree = None,
) -> tuple[jax.Array, jax.Array]:
    """The ``ExpertDispatch`` without devices: every expert runs here, one group per row (``weight_axes`` unused)."""
    del weight_axes
    n_experts = stacked_experts(expert_weights)
    return through_experts(
        x_BxLxD,
        expert_BxLxR,
        weight_BxLxR,
        n_experts,
        capacity_factor,
        lambda buffer: run_on_buffer(expert_fn, expert_weights, buffer),
    )


def route_and_dispatch(
    x_BxLxD: jax.Array,
    router_logits_BxLxE: jax.Array,
    expert_fn: ExpertFn | Callable[..., jax.Array],
    expert_weights: PyTree,
    *,
    top_k: int,
    capacity_factor: float,
    dispatch: ExpertDispatch = local_dispatch,
    token_mean: TokenMean = mean_over_tokens,
    weight_axes: PyTree = None,
) -> tuple[jax.Array, MoEStats]:
    """One MoE layer through a given ``dispatch``: (y_BxLxD in x's dtype, its ``MoEStats``).

    ``expert_fn`` is an ``ExpertFn``, or for a dropless dispatch a ``GroupedExpertFn``
    (``shardlib.parallel.dropless_experts``). What ``shardlib.parallel.experts.moe_dispatch`` runs once it has chosen the
    dispatch and token mean for its context; a caller that chose them itself
    (the project's pipeline stages) calls this.
    """
    routing = router_top_k(router_logits_BxLxE, top_k, token_mean)
    y_BxLxD, dropped = dispatch(
        x_BxLxD,
        routing.expert_BxLxR,
        routing.weight_BxLxR,
        expert_fn,
        expert_weights,
        capacity_factor=capacity_factor,
        weight_axes=weight_axes,
    )
    return y_BxLxD.astype(x_BxLxD.dtype), MoEStats(routing.aux_loss, routing.z_loss, dropped)
