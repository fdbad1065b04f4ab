"""Mixture-of-experts MLP: top-k router, capacity-padded expert buffers, auxiliary losses.

Pure functions of plain arrays plus one NNX module holding the parameters of
every MoE layer stacked on a leading axis (``MoEStack``). Nothing here names a
mesh axis: moving tokens to the devices that hold their experts is the job of
an ``ExpertDispatch`` callable the caller passes to the model, as it passes
the attention function (``shardlib.parallel.experts.expert_dispatch``); without one,
every expert runs where the tokens are (``local_dispatch``).

Semantics (identical on every mesh where no dispatch group is split):
* Router: float32 logits ``h @ router``, softmax over all E experts, the k
  largest probabilities pick the experts. With k > 1 the k weights are
  renormalised to sum to 1 (Mixtral); with k = 1 the weight is the raw
  probability (Switch), so the main loss still trains the router.
* Capacity: tokens are dispatched in groups, a group being the tokens of one
  sequence that one device holds (the whole sequence unless the length axis
  is sharded). Each expert takes at most C = ceil(capacity_factor * T * k / E)
  (token, choice) pairs of a group of T tokens, in priority order: every
  token's first choice, in sequence order, before any second choice (GShard).
  A pair past C is dropped: it contributes nothing (the token keeps only its
  residual path for that choice).
* Load-balancing loss (Switch / GShard): E * sum_e f_e * P_e, f_e the fraction
  of (token, choice) pairs routed to e before dropping, P_e the mean router
  probability of e, both over all tokens of the batch; 1 when uniform.
* Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.

Shape suffixes: B batch, L length, D d_model, E experts, R routes (the top-k choices), C capacity,
F expert hidden width, G groups held by one device (rows), X expert shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from shardlib.models.layers import normal_init


class ExpertWeights(NamedTuple):
    """One MoE layer's expert parameters (SwiGLU per expert).

    gate and up stay two weights here, unlike the dense layers' fused
    ``gate_up`` (``shardlib.models.layers``): under tensor parallelism the experts run
    inside ``shardlib.parallel.experts``' shard_map, whose tokens are marked
    varying over the tensor axes, so the backward pass adds the two input
    gradients locally and all-reduces their sum once; fusing would save nothing.
    """

    gate: jax.Array  # [E, D, F]
    up: jax.Array  # [E, D, F]
    down: jax.Array  # [E, F, D]


class MoEWeights(NamedTuple):
    """One MoE layer's parameters: the router and the experts."""

    router: jax.Array  # [D, E]
    experts: ExpertWeights


class Routing(NamedTuple):
    """The router's decision for every token."""

    expert_BxLxR: jax.Array  # int32 expert ids, best first
    weight_BxLxR: jax.Array  # float32 combine weights
    aux_loss: jax.Array  # scalar load-balancing loss
    z_loss: jax.Array  # scalar router z-loss


ExpertDispatch = Callable[..., tuple[jax.Array, jax.Array]]
"""``dispatch(x_BxLxD, expert_BxLxR, weight_BxLxR, experts, *, capacity_factor) -> (y_BxLxD, dropped)``.

Runs every (token, choice) pair through its expert within capacity and sums
the weighted outputs per token; ``dropped`` is the number of pairs past
capacity (float32 scalar, whole batch).
"""


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


TokenMean = Callable[[jax.Array], jax.Array]
"""``mean(x_BxLx___) -> x___``: the mean of a per-token statistic over every token of the batch.

The default, ``mean_over_tokens``, averages the array it is given; a caller
holding only its own block of the batch (inside a ``shard_map`` manual over
the token axes: the pipeline's stages) passes one that also averages over
the other blocks, so that the losses are the whole batch's, as on one device.
"""


def mean_over_tokens(x_BxLx___: jax.Array) -> jax.Array:
    """The default ``TokenMean``: the mean over the batch and length dimensions."""
    return jnp.mean(x_BxLx___, axis=(0, 1))


def route(h_BxLxD: jax.Array, router_DxE: jax.Array, top_k: int, token_mean: TokenMean = mean_over_tokens) -> Routing:
    """Top-k routing in float32, with the load-balancing and z losses over all tokens (``token_mean``'s)."""
    n_experts = router_DxE.shape[-1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({n_experts})")
    logits_BxLxE = jnp.einsum("bld,de->ble", h_BxLxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
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


def expert_ffn(x_Ex___xD: jax.Array, w: ExpertWeights) -> jax.Array:
    """SwiGLU of every expert on its own tokens: [E, ..., D] -> [E, ..., D] (weights cast to x's dtype)."""
    dtype = x_Ex___xD.dtype
    gate_Ex___xF = jnp.einsum("e...d,edf->e...f", x_Ex___xD, w.gate.astype(dtype))
    up_Ex___xF = jnp.einsum("e...d,edf->e...f", x_Ex___xD, w.up.astype(dtype))
    return jnp.einsum("e...f,efd->e...d", jax.nn.silu(gate_Ex___xF) * up_Ex___xF, w.down.astype(dtype))


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


def local_dispatch(
    x_BxLxD: jax.Array,
    expert_BxLxR: jax.Array,
    weight_BxLxR: jax.Array,
    experts: ExpertWeights,
    *,
    capacity_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """The ``ExpertDispatch`` without devices: every expert runs here, one group per row."""
    n_experts = experts.gate.shape[0]
    return through_experts(
        x_BxLxD, expert_BxLxR, weight_BxLxR, n_experts, capacity_factor, lambda buf: expert_ffn(buf, experts)
    )


class MoEStats(NamedTuple):
    """Per-layer MoE statistics (scalars), stacked over layers by the scan."""

    aux_loss: jax.Array
    z_loss: jax.Array
    dropped: jax.Array  # (token, choice) pairs dropped, whole batch


def moe_mlp(
    h_BxLxD: jax.Array,
    w: MoEWeights,
    *,
    top_k: int,
    capacity_factor: float,
    dispatch: ExpertDispatch | None = None,
    token_mean: TokenMean = mean_over_tokens,
) -> tuple[jax.Array, MoEStats]:
    """The MoE replacement of the SwiGLU MLP: normalised input [B, L, D] -> output [B, L, D].

    ``dispatch`` moves tokens to their experts and back (expert parallelism
    over a mesh, ``shardlib.parallel.experts``); None runs every expert locally.
    ``token_mean`` takes the router's losses over the batch (``TokenMean``).
    """
    routing = route(h_BxLxD, w.router, top_k, token_mean)
    dispatch = dispatch or local_dispatch
    y_BxLxD, dropped = dispatch(
        h_BxLxD, routing.expert_BxLxR, routing.weight_BxLxR, w.experts, capacity_factor=capacity_factor
    )
    return y_BxLxD.astype(h_BxLxD.dtype), MoEStats(routing.aux_loss, routing.z_loss, dropped)


@jax.custom_vjp
def attach_loss(x: jax.Array, loss: jax.Array) -> jax.Array:
    """``x`` unchanged, carrying ``loss`` (a float32 scalar) into the gradients: differentiating
    anything of ``x`` also differentiates ``loss`` with cotangent 1, as if ``loss`` were added to the
    objective.

    For a function that may return only an activation (a pipeline stage,
    ``shardlib.parallel.pipeline.actions``) while its layers add an auxiliary
    loss (the router's): the caller adds the loss's value to what it reports itself.
    """
    del loss
    return x


def _attach_forward(x, loss):
    if loss.shape != () or loss.dtype != jnp.float32:
        raise ValueError(f"attach_loss takes a float32 scalar loss, got {loss.dtype}{list(loss.shape)}")
    return x, None


def _attach_backward(_, dx):
    # Not ones_like of a residual: that would copy a sharding on the whole mesh's automatic axes
    # into a caller's manual region (a pipeline stage's shard_map), which JAX refuses.
    return dx, jnp.ones((), jnp.float32)


attach_loss.defvjp(_attach_forward, _attach_backward)


class MoEStack(nnx.Module):
    """Router and expert weights of every MoE layer, stacked along a leading layer axis.

    Paths and logical axes (M = number of MoE layers):
      moe/router [M, D, E]        ("layers", "embed", None)     replicated over experts: every token needs all logits
      moe/gate, up [M, E, D, F]   ("layers", "experts", "embed", "mlp")
      moe/down [M, E, F, D]       ("layers", "experts", "mlp", "embed")
    """

    def __init__(self, n_moe_layers: int, cfg: Any, *, dtype: Any, rngs: nnx.Rngs):
        m, d, e = n_moe_layers, cfg.d_model, cfg.moe.n_experts
        f = cfg.moe.expert_d_ff or cfg.d_ff
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.router = nnx.Param(
            normal_init(rngs.params(), (m, d, e), std, dtype), out_sharding=("layers", "embed", None)
        )
        expert_in = ("layers", "experts", "embed", "mlp")
        self.gate = nnx.Param(normal_init(rngs.params(), (m, e, d, f), std, dtype), out_sharding=expert_in)
        self.up = nnx.Param(normal_init(rngs.params(), (m, e, d, f), std, dtype), out_sharding=expert_in)
        self.down = nnx.Param(
            normal_init(rngs.params(), (m, e, f, d), out_std, dtype), out_sharding=("layers", "experts", "mlp", "embed")
        )

    def weights(self) -> MoEWeights:
        """The stacked arrays, each with a leading [M] axis for ``lax.scan``."""
        return MoEWeights(self.router[...], ExpertWeights(self.gate[...], self.up[...], self.down[...]))
