"""Mixture-of-experts MLP with SwiGLU experts: the project's client of ``shardlib.parallel``'s expert dispatch.

Pure functions of plain arrays plus one NNX module holding the parameters of
every MoE layer stacked on a leading axis (``MoEStack``). The routing (top-k
router, capacity, capacity-padded buffers, load-balancing and z losses; their
semantics in ``shardlib.parallel.expert_routing``) and the moving of tokens to
the devices that hold their experts (``shardlib.parallel.experts``) know
nothing of SwiGLU: this module gives them its expert function, ``expert_ffn``,
and its weights. Nothing here names a mesh axis: the ``ExpertDispatch`` is a
callable the caller passes to the model, as it passes the attention function
(``shardlib.parallel.experts.expert_dispatch``); without one, every expert runs
where the tokens are (``local_dispatch``).

The routing names are re-exported here for the project's own importers.

Shape suffixes: B batch, L length, D d_model, E experts, R routes (the top-k choices), C capacity,
F expert hidden width, N tokens per expert, G groups held by one device (rows), X expert shards.
"""

from __future__ import annotations

import math
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from shardlib.models.layers import normal_init
from shardlib.parallel.dropless_experts import DroplessDispatch, is_dropless
from shardlib.parallel.expert_routing import (
    ExpertDispatch,
    MoEStats,
    Routing,
    TokenMean,
    capacity,
    local_dispatch,
    mean_over_tokens,
    route_and_dispatch,
    router_top_k,
)

__all__ = [  # the routing names are re-exported for the project's importers (pipeline stages, report)
    "EXPERT_WEIGHT_AXES",
    "ExpertDispatch",
    "ExpertWeights",
    "MoEStack",
    "MoEStats",
    "MoEWeights",
    "Routing",
    "TokenMean",
    "attach_loss",
    "capacity",
    "checked_dispatch",
    "expert_ffn",
    "grouped_expert_ffn",
    "local_dispatch",
    "local_experts",
    "mean_over_tokens",
    "moe_mlp",
    "route",
    "router_logits",
]


_Leaf = TypeVar("_Leaf")


class ExpertWeights(NamedTuple, Generic[_Leaf]):
    """One MoE layer's expert parameters (SwiGLU per expert); generic in its leaves: arrays for the
    weights, logical axis names per dimension for ``EXPERT_WEIGHT_AXES``.

    gate and up stay two weights here, unlike the dense layers' fused
    ``gate_up`` (``shardlib.models.layers``): under tensor parallelism the experts run
    inside ``shardlib.parallel.experts``' shard_map, whose tokens are marked
    varying over the tensor axes, so the backward pass adds the two input
    gradients locally and all-reduces their sum once; fusing would save nothing.
    """

    gate: _Leaf  # [E, D, F]
    up: _Leaf  # [E, D, F]
    down: _Leaf  # [E, F, D]


class MoEWeights(NamedTuple):
    """One MoE layer's parameters: the router and the experts."""

    router: jax.Array  # [D, E]
    experts: ExpertWeights[jax.Array]


def expert_ffn(w: ExpertWeights[jax.Array], x_ExNxD: jax.Array) -> jax.Array:
    """SwiGLU of every expert on its own tokens: [E, N, D] -> [E, N, D] (weights cast to x's dtype).

    The project's ``expert_fn`` for ``shardlib.parallel.experts``: called there on each
    device's own experts (and, under tensor parallelism, its slice of their hidden units,
    ``EXPERT_WEIGHT_AXES``, whose partial outputs the dispatch sums).
    """
    dtype = x_ExNxD.dtype
    gate_ExNxF = jnp.einsum("e...d,edf->e...f", x_ExNxD, w.gate.astype(dtype))
    up_ExNxF = jnp.einsum("e...d,edf->e...f", x_ExNxD, w.up.astype(dtype))
    return jnp.einsum("e...f,efd->e...d", jax.nn.silu(gate_ExNxF) * up_ExNxF, w.down.astype(dtype))


def grouped_expert_ffn(w: ExpertWeights[jax.Array], x_MxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """SwiGLU of every expert on its own rows, one grouped matmul per weight: [M, D] -> [M, D].

    The project's ``GroupedExpertFn`` for the dropless dispatch
    (``shardlib.parallel.dropless_experts``): rows sorted by expert, expert e on
    ``group_sizes_E[e]`` of them (``jax.lax.ragged_dot``); rows past their sum come back zero.
    """
    dtype = x_MxD.dtype
    gate_MxF = jax.lax.ragged_dot(x_MxD, w.gate.astype(dtype), group_sizes_E)
    up_MxF = jax.lax.ragged_dot(x_MxD, w.up.astype(dtype), group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate_MxF) * up_MxF, w.down.astype(dtype), group_sizes_E)


# Under tensor parallelism each expert's hidden units stay split over the `mlp` axes inside the
# dispatch (column-parallel gate and up, row-parallel down); `embed` is gathered there.
EXPERT_WEIGHT_AXES = ExpertWeights(("experts", None, "mlp"), ("experts", None, "mlp"), ("experts", "mlp", None))


def local_experts(dispatch_kind: str) -> ExpertDispatch:
    """The dispatch that runs every expert here, for ``model.moe.dispatch`` (capacity or dropless)."""
    return DroplessDispatch() if dispatch_kind == "dropless" else local_dispatch


def checked_dispatch(dispatch: ExpertDispatch | None, dispatch_kind: str) -> ExpertDispatch:
    """``dispatch`` (None: ``local_experts``) if it is of ``model.moe.dispatch``'s kind; refuses one that is not."""
    if dispatch is None:
        return local_experts(dispatch_kind)
    if is_dropless(dispatch) != (dispatch_kind == "dropless"):
        given = "dropless" if is_dropless(dispatch) else "capacity"
        raise ValueError(
            f"model.moe.dispatch={dispatch_kind} but the layer was given a {given} dispatch; build it with "
            f"{'dropless_dispatch' if dispatch_kind == 'dropless' else 'expert_dispatch'}(shard)"
        )
    return dispatch


def router_logits(h_BxLxD: jax.Array, router_DxE: jax.Array) -> jax.Array:
    """The router's float32 logits [B, L, E]."""
    return jnp.einsum("bld,de->ble", h_BxLxD.astype(jnp.float32), router_DxE.astype(jnp.float32))


def route(h_BxLxD: jax.Array, router_DxE: jax.Array, top_k: int, token_mean: TokenMean = mean_over_tokens) -> Routing:
    """Top-k routing in float32, with the load-balancing and z losses over all tokens (``token_mean``'s)."""
    return router_top_k(router_logits(h_BxLxD, router_DxE), top_k, token_mean)


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
    Both are chosen by the caller (the parallel plan, a pipeline stage), and
    ``route_and_dispatch`` runs them: what ``moe_dispatch`` runs for a user.
    A dropless dispatch (``shardlib.parallel.dropless_experts``) gets the grouped
    experts (``grouped_expert_ffn``) and ignores ``capacity_factor``.
    """
    dispatch = dispatch or local_dispatch
    return route_and_dispatch(
        h_BxLxD,
        router_logits(h_BxLxD, w.router),
        grouped_expert_ffn if is_dropless(dispatch) else expert_ffn,
        w.experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        dispatch=dispatch,
        token_mean=token_mean,
        weight_axes=EXPERT_WEIGHT_AXES,
    )


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
