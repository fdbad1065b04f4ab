"""Dropless mixture of experts: every (token, choice) pair through its expert, with a grouped matmul.

The capacity dispatch (``shardlib.parallel.experts``) pads every expert to C
slots per group and drops what overflows. Here nothing is padded per expert
and nothing is dropped: the T*k token copies are sorted by expert, and each
expert runs on exactly its own rows with one grouped matmul
(``jax.lax.ragged_dot``: rows [0, s_0) to expert 0, [s_0, s_0 + s_1) to
expert 1, ...). The router and its auxiliary losses are the capacity
dispatch's (``shardlib.parallel.expert_routing.route_and_dispatch``): only the
``ExpertDispatch`` differs, and it reports zero dropped pairs.

An expert function here is a ``GroupedExpertFn``: ``grouped_fn(expert_weights,
x_MxD, group_sizes_E) -> y_MxD``, rows sorted by expert, rows past
``sum(group_sizes_E)`` padding whose output is ignored (``ragged_dot`` gives 0 there).

With expert parallelism (the experts split over the ``experts`` axes, X
devices, each holding E/X experts) the tokens reach their experts by one of
two transports, chosen by backend (``choose_transport``):

* ``ragged_all_to_all`` (GPU, TPU): each device sorts its copies by expert,
  hence by destination, and ``jax.lax.ragged_all_to_all`` sends each peer
  exactly the copies routed to its experts; a second one brings the outputs
  back. On the wire per device and direction: the copies that leave it,
  (X-1)/X * T*k*D elements when the routing is balanced. Its receive buffer
  is sized for the worst case (every copy of the X peers to one device):
  X*T*k*D elements, which no routing can overflow.
* ``all_gather`` (XLA:CPU, which has no ragged all-to-all): the tokens and
  their routing are all-gathered over the expert axes, each device runs its
  own experts on the copies routed to them, and one reduce-scatter sums the
  weighted outputs back to the tokens' owners. On the wire per device:
  (X-1)*T*D elements in (the gather) and (X-1)*T*D out (the reduce-scatter),
  k times less than an all-to-all of worst-case per-destination buffers would
  move. Memory: the gathered X*T*D tokens and X*T*k*D sorted copies, as large
  as the ragged path's receive buffer.

``dropless_bytes`` gives both transports' figures. T is a device's tokens,
D the model width, k the routes per token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.expert_routing import (
    MoEStats,
    PyTree,
    TokenMean,
    check_top_k,
    mean_over_tokens,
    route_and_dispatch,
    stacked_experts,
)
from shardlib.parallel.experts import (
    check_weights_stack,
    dispatch_context,
    place_dispatch,
    token_mean_in_manual_region,
)

GroupedExpertFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
"""``grouped_fn(expert_weights, x_MxD, group_sizes_E) -> y_MxD``: rows sorted by expert, expert e on its
``group_sizes_E[e]`` rows (int32), rows past their sum padding (their output is ignored)."""

Transport = Literal["ragged_all_to_all", "all_gather"]
TRANSPORTS: tuple[str, ...] = ("ragged_all_to_all", "all_gather")
_RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")  # backends whose XLA has ragged-all-to-all


def choose_transport(platform: str, setting: str = "auto") -> Transport:
    """The expert transport for a backend: ``setting`` if forced, else ragged where the backend has it.

    Args:
      platform: the mesh's devices' platform (``"cpu"``, ``"gpu"``, ``"tpu"``).
      setting: ``"auto"``, ``"ragged_all_to_all"`` or ``"all_gather"`` (``model.moe.dropless_transport``).
    Raises:
      ValueError: an unknown setting, naming the ones that work.
    """
    if setting == "auto":
        return "ragged_all_to_all" if platform in _RAGGED_PLATFORMS else "all_gather"
    if setting not in TRANSPORTS:
        raise ValueError(
            f"model.moe.dropless_transport={setting!r} is not a transport; use auto, {' or '.join(TRANSPORTS)}"
        )
    return setting  # type: ignore[return-value]  # one of TRANSPORTS, checked above


@dataclasses.dataclass(frozen=True)
class DroplessDispatch:
    """An ``ExpertDispatch`` that drops nothing; its ``expert_fn`` is a ``GroupedExpertFn``.

    ``shard`` None runs every expert here. With a mesh, ``transport`` carries the
    tokens over the expert axes (module docstring). ``manual``: the dispatch is
    traced inside a ``shard_map`` already manual over ``token_axes`` (a pipeline
    stage), whose expert axes ``ep_axes`` (``ep_size`` devices) are manual too.
    """

    shard: ActivationSharding | None = None
    transport: Transport = "all_gather"
    manual: bool = False
    token_axes: tuple[str, ...] = ()
    ep_axes: tuple[str, ...] = ()
    ep_size: int = 1
    exchange: Callable[..., jax.Array] | None = None  # stands in for jax.lax.ragged_all_to_all (tests on XLA:CPU)
    dropless: bool = dataclasses.field(default=True, init=False)  # what the MoE layer checks

    def __call__(
        self,
        x_BxLxD: jax.Array,
        expert_BxLxR: jax.Array,
        weight_BxLxR: jax.Array,
        expert_fn: GroupedExpertFn,
        expert_weights: PyTree,
        *,
        capacity_factor: float | None = None,
        weight_axes: PyTree = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(y_BxLxD, dropped = 0.0): every pair through its expert (``capacity_factor`` is not used)."""
        del capacity_factor
        if self.manual:
            y_GxTxD = _shard_body(
                x_BxLxD,
                expert_BxLxR,
                weight_BxLxR,
                expert_fn,
                expert_weights,
                ep_axes=self.ep_axes,
                ep_size=self.ep_size,
                tensor_axes=(),
                transport=self.transport,
                exchange=self.exchange,
            )
            return y_GxTxD, jnp.zeros((), jnp.float32)
        if self.shard is None:
            n_experts = stacked_experts(expert_weights)
            y_BxLxD = grouped_combine(x_BxLxD, expert_BxLxR, weight_BxLxR, expert_fn, expert_weights, 0, n_experts)
            return y_BxLxD, jnp.zeros((), jnp.float32)
        return _over_mesh(self, x_BxLxD, expert_BxLxR, weight_BxLxR, expert_fn, expert_weights, weight_axes)


_TRANSPORT_WORDS = {
    "ragged_all_to_all": "ragged_all_to_all out and back (exactly the routed copies)",
    "all_gather": "tokens all-gathered over the expert axes, outputs reduce-scattered home "
    "(the dropless fallback: XLA:CPU has no ragged-all-to-all)",
}


def describe_dispatch(dispatch: Any, n_experts: int, expert_devices: int) -> str:
    """One line naming an MoE layer's dispatch, for ``describe``: capacity or dropless, and its transport."""
    if not is_dropless(dispatch):
        return f"experts: {n_experts} over expert={expert_devices} (capacity dispatch, all-to-all of padded buffers)"
    if expert_devices == 1:
        return f"experts: {n_experts} on every device (dropless: grouped matmul, nothing to move)"
    return f"experts: {n_experts} over expert={expert_devices} (dropless: grouped matmul; {_TRANSPORT_WORDS[dispatch.transport]})"


def dropless_dispatch(
    shard: ActivationSharding | None, transport: str = "auto", platform: str | None = None
) -> DroplessDispatch:
    """The dropless ``ExpertDispatch`` over ``shard``'s mesh (None: every expert here).

    ``transport``: ``auto`` (``choose_transport`` on ``platform``, default the mesh's) or a forced one.
    """
    if shard is None:
        return DroplessDispatch()
    platform = platform or shard.mesh.devices.flat[0].platform
    return DroplessDispatch(shard, choose_transport(platform, transport))


def dropless_in_manual_region(
    token_axes: tuple[str, ...], ep_axes: tuple[str, ...], ep_size: int, transport: Transport
) -> DroplessDispatch:
    """The dropless dispatch inside a ``shard_map`` manual over ``token_axes`` (the expert axes among
    them): the per-shard body as it is; other mesh axes stay automatic."""
    return DroplessDispatch(None, transport, True, token_axes, ep_axes, ep_size)


def dropless_moe_dispatch(
    x_BxLxD: jax.Array,
    router_logits_BxLxE: jax.Array,
    grouped_fn: GroupedExpertFn,
    expert_weights: PyTree,
    *,
    top_k: int,
    shard: ActivationSharding | None = None,
    weight_axes: PyTree = None,
    transport: str = "auto",
) -> tuple[jax.Array, MoEStats]:
    """``shardlib.parallel.experts.moe_dispatch`` without capacity: (y_BxLxD in x's dtype, ``MoEStats``
    with ``dropped`` 0). The same router and losses; every (token, choice) pair reaches its expert.

    Args:
      x_BxLxD, router_logits_BxLxE, expert_weights, top_k, shard, weight_axes: as ``moe_dispatch``.
      grouped_fn: a ``GroupedExpertFn`` (``jax.lax.ragged_dot`` per weight), on this device's experts.
      transport: ``auto`` (by backend, ``choose_transport``), ``ragged_all_to_all`` or ``all_gather``.
    Raises:
      ValueError: as ``moe_dispatch``; an unknown transport.
    """
    n_experts = router_logits_BxLxE.shape[-1]
    check_top_k(top_k, n_experts)
    dispatch, local_experts = DroplessDispatch(), n_experts
    token_mean: TokenMean = mean_over_tokens
    if shard is not None:
        where = dispatch_context(shard, n_experts)
        chosen = choose_transport(shard.mesh.devices.flat[0].platform, transport)
        if where.manual:
            dispatch = dropless_in_manual_region(where.token_axes, where.ep_axes, where.ep_size, chosen)
            token_mean, local_experts = token_mean_in_manual_region(where.token_axes), n_experts // where.ep_size
        else:
            dispatch = DroplessDispatch(shard, chosen)
    check_weights_stack(stacked_experts(expert_weights), n_experts, local_experts)
    return route_and_dispatch(
        x_BxLxD,
        router_logits_BxLxE,
        grouped_fn,
        expert_weights,
        top_k=top_k,
        capacity_factor=1.0,  # not used: nothing is dropped
        dispatch=dispatch,
        token_mean=token_mean,
        weight_axes=weight_axes,
    )


def is_dropless(dispatch: Any) -> bool:
    """Whether ``dispatch`` (an ``ExpertDispatch``) takes a ``GroupedExpertFn`` and drops nothing."""
    return bool(getattr(dispatch, "dropless", False))


def sort_by_expert(expert_M: jax.Array, n_groups: int) -> tuple[jax.Array, jax.Array]:
    """(order_M, group_sizes): the stable order that sorts ``expert_M`` (int32 group ids, ``n_groups``
    meaning "none": sorted last, in no group), and each group's size [n_groups] (int32)."""
    order_M = jnp.argsort(expert_M, stable=True)
    sizes = jnp.bincount(expert_M, length=n_groups + 1)[:n_groups].astype(jnp.int32)
    return order_M, sizes


def unsort(sorted_MxD: jax.Array, order_M: jax.Array) -> jax.Array:
    """The rows of ``sorted_MxD`` (= x[order_M]) back in x's order: a gather by the inverse permutation.

    Not a scatter-set: XLA:CPU's partitioner all-reduces a scatter over automatic axes with its
    combiner, and its bfloat16 all-reduce promotion aborts on a set's (issue 32).
    """
    return sorted_MxD[jnp.argsort(order_M)]


def run_grouped(
    grouped_fn: GroupedExpertFn, expert_weights: PyTree, x_MxD: jax.Array, group_M: jax.Array, n_groups: int
) -> jax.Array:
    """``grouped_fn`` on rows ``x_MxD`` whose experts are ``group_M`` (``n_groups``: none), in their own
    order: sorted, run, unsorted; rows in no group come back zero. Refuses a wrong output shape."""
    order_M, sizes = sort_by_expert(group_M, n_groups)
    y_sorted_MxD = grouped_fn(expert_weights, x_MxD[order_M], sizes)
    if getattr(y_sorted_MxD, "shape", None) != x_MxD.shape:
        raise ValueError(
            f"a grouped expert_fn must map x_MxD {x_MxD.shape} to y_MxD of the same shape, "
            f"got {getattr(y_sorted_MxD, 'shape', type(y_sorted_MxD).__name__)}"
        )
    y_MxD = unsort(y_sorted_MxD, order_M)
    return jnp.where((group_M < n_groups)[:, None], y_MxD, 0)


def grouped_combine(
    x_Bx___xD: jax.Array,
    expert_Bx___xR: jax.Array,
    weight_Bx___xR: jax.Array,
    grouped_fn: GroupedExpertFn,
    expert_weights: PyTree,
    first_expert: jax.Array | int,
    n_local: int,
) -> jax.Array:
    """Every token's pairs routed to experts [first_expert, first_expert + n_local) (the weights held
    here), weighted and summed per token: [..., D] like x; pairs for other experts add nothing."""
    d = x_Bx___xD.shape[-1]
    k = expert_Bx___xR.shape[-1]
    x_NxD = x_Bx___xD.reshape(-1, d)
    local_M = expert_Bx___xR.reshape(-1) - first_expert
    group_M = jnp.where((local_M >= 0) & (local_M < n_local), local_M, n_local).astype(jnp.int32)
    copies_MxD = jnp.repeat(x_NxD, k, axis=0)
    y_MxD = run_grouped(grouped_fn, expert_weights, copies_MxD, group_M, n_local)
    weight_M = weight_Bx___xR.reshape(-1).astype(y_MxD.dtype)
    y_NxD = jnp.sum((y_MxD * weight_M[:, None]).reshape(-1, k, d), axis=1)
    return y_NxD.reshape(x_Bx___xD.shape)


def _ep_name(ep_axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return ep_axes[0] if len(ep_axes) == 1 else ep_axes


def _shard_body(
    x_GxTxD: jax.Array,
    expert_GxTxR: jax.Array,
    weight_GxTxR: jax.Array,
    grouped_fn: GroupedExpertFn,
    weights: PyTree,
    *,
    ep_axes: tuple[str, ...],
    ep_size: int,
    tensor_axes: tuple[str, ...],
    transport: Transport,
    exchange: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """One device's dropless layer inside a ``shard_map`` manual over the token and expert axes: its
    tokens' outputs [G, T, D]. ``weights`` are its E/X experts (split over ``tensor_axes`` too, whose
    peers return partial sums, added with one psum). ``exchange``: ``ragged_all_to_all``'s stand-in."""
    n_local = stacked_experts(weights)

    def tensor_sum(y: jax.Array) -> jax.Array:
        return jax.lax.psum(y, tensor_axes) if tensor_axes else y

    def varying(x: jax.Array) -> jax.Array:
        return jax.lax.pcast(x, tensor_axes, to="varying") if tensor_axes else x

    if ep_size == 1:
        y = grouped_combine(varying(x_GxTxD), expert_GxTxR, weight_GxTxR, grouped_fn, weights, 0, n_local)
        return tensor_sum(y)
    ep = _ep_name(ep_axes)
    if transport == "all_gather":
        expert_XGxTxR = jax.lax.all_gather(expert_GxTxR, ep, axis=0, tiled=True)
        x_XGxTxD, weight_XGxTxR = gather_rows(x_GxTxD, ep), gather_rows(weight_GxTxR, ep)
        first = jax.lax.axis_index(ep) * n_local
        partial_XGxTxD = grouped_combine(
            varying(x_XGxTxD), expert_XGxTxR, weight_XGxTxR, grouped_fn, weights, first, n_local
        )
        return tensor_sum(_sum_rows_home(partial_XGxTxD, ep))
    return _ragged_body(
        x_GxTxD, expert_GxTxR, weight_GxTxR, grouped_fn, weights, ep, ep_size, tensor_sum, varying, exchange
    )


def _sum_rows_home(x_XGx___: jax.Array, ep: str | tuple[str, ...]) -> jax.Array:
    """Reduce-scatter over ``ep`` along dim 0, summed in float32 (then x's dtype).

    XLA:CPU promotes a bfloat16 reduction to float32 itself, and aborts doing so on one inside a
    pipeline's partly manual shard_map (its reduction computation ends in a sharding copy).
    """
    summed = jax.lax.psum_scatter(x_XGx___.astype(jnp.float32), ep, scatter_dimension=0, tiled=True)
    return summed.astype(x_XGx___.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_rows(x_Gx___: jax.Array, ep: str | tuple[str, ...]) -> jax.Array:
    """``all_gather`` of floats over ``ep`` along dim 0 (tiled); its backward is ``_sum_rows_home``'s float32 sum."""
    return jax.lax.all_gather(x_Gx___, ep, axis=0, tiled=True)


def _gather_forward(x_Gx___, ep):
    return gather_rows(x_Gx___, ep), None


def _gather_backward(ep, _, dy_XGx___):
    return (_sum_rows_home(dy_XGx___, ep),)


gather_rows.defvjp(_gather_forward, _gather_backward)


def _ragged_body(x_GxTxD, expert_GxTxR, weight_GxTxR, grouped_fn, weights, ep, ep_size, tensor_sum, varying, exchange):
    """The ``ragged_all_to_all`` transport (module docstring): sizes per (sender, receiver, local expert)
    are all-gathered first, so every device knows where its rows land and what it receives."""
    exchange = exchange or jax.lax.ragged_all_to_all
    n_local = stacked_experts(weights)
    d, k = x_GxTxD.shape[-1], expert_GxTxR.shape[-1]
    x_NxD = x_GxTxD.reshape(-1, d)
    expert_M = expert_GxTxR.reshape(-1).astype(jnp.int32)
    m = expert_M.shape[0]
    order_M, sizes_E = sort_by_expert(expert_M, n_local * ep_size)
    sorted_MxD = jnp.repeat(x_NxD, k, axis=0)[order_M]
    sizes_SxXxL = jax.lax.all_gather(sizes_E.reshape(ep_size, n_local), ep)  # [sender, receiver, local expert]
    send_SxX = jnp.sum(sizes_SxXxL, axis=-1)
    me = jax.lax.axis_index(ep)
    send_X, recv_S = send_SxX[me], send_SxX[:, me]
    in_off_SxX = jnp.cumsum(send_SxX, axis=1) - send_SxX  # where each sender's slice for X starts
    out_off_SxX = jnp.cumsum(send_SxX, axis=0) - send_SxX  # where it lands in X's buffer
    recv_RxD = exchange(
        sorted_MxD,
        jnp.zeros((ep_size * m, d), x_GxTxD.dtype),
        in_off_SxX[me],
        send_X,
        out_off_SxX[me],
        recv_S,
        axis_name=ep,
    )
    # Received rows: sender by sender, each sender's sorted by local expert; the rest is padding.
    runs = sizes_SxXxL[:, me, :].reshape(-1)
    run_R = jnp.searchsorted(jnp.cumsum(runs), jnp.arange(ep_size * m), side="right")
    group_R = jnp.where(run_R < runs.shape[0], run_R % n_local, n_local).astype(jnp.int32)
    y_RxD = tensor_sum(run_grouped(grouped_fn, weights, varying(recv_RxD), group_R, n_local))
    back_MxD = exchange(
        y_RxD, jnp.zeros((m, d), y_RxD.dtype), out_off_SxX[:, me], recv_S, in_off_SxX[:, me], send_X, axis_name=ep
    )
    y_MxD = unsort(back_MxD, order_M)
    weight_M = weight_GxTxR.reshape(-1).astype(y_MxD.dtype)
    return jnp.sum((y_MxD * weight_M[:, None]).reshape(-1, k, d), axis=1).reshape(x_GxTxD.shape)


def _over_mesh(dispatch, x_BxLxD, expert_BxLxR, weight_BxLxR, grouped_fn, expert_weights, weight_axes):
    """``DroplessDispatch`` in a jitted program over its mesh: one ``shard_map``, as the capacity dispatch's."""
    shard = dispatch.shard
    layout, (x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights) = place_dispatch(
        shard, x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights, weight_axes
    )
    x_spec, route_spec, _, ep_axes, ep_size, w_specs, tensor_axes = layout
    body = functools.partial(
        _shard_body,
        grouped_fn=grouped_fn,
        ep_axes=ep_axes,
        ep_size=ep_size,
        tensor_axes=tensor_axes,
        transport=dispatch.transport,
        exchange=dispatch.exchange,
    )
    run = jax.shard_map(
        lambda x, e, w, ws: body(x, e, w, weights=ws),
        mesh=shard.mesh,
        in_specs=(x_spec, route_spec, route_spec, w_specs),
        out_specs=x_spec,
    )
    return run(x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights), jnp.zeros((), jnp.float32)


def dropless_bytes(tokens_per_device: int, top_k: int, d: int, itemsize: int, ep_size: int) -> dict[str, dict]:
    """Per device and MoE layer forward, each transport's wire bytes and its largest buffer (bytes).

    ``ragged_all_to_all``: the copies that leave, (X-1)/X of T*k rows each way under balanced routing
    (its worst case: all of them); receive buffer X*T*k rows. ``all_gather``: (X-1)*T rows gathered
    (plus their routes: k int32 ids and k float32 weights each) and (X-1)*T rows reduce-scattered;
    X*T*k sorted copies.
    """
    t, x = tokens_per_device, ep_size
    row = d * itemsize
    return {
        "ragged_all_to_all": {
            "wire_bytes": 2 * (x - 1) * t * top_k * row // x,
            "worst_wire_bytes": 2 * t * top_k * row,
            "buffer_bytes": x * t * top_k * row,
        },
        "all_gather": {
            "wire_bytes": 2 * (x - 1) * t * row + (x - 1) * t * top_k * 8,
            "worst_wire_bytes": 2 * (x - 1) * t * row + (x - 1) * t * top_k * 8,
            "buffer_bytes": x * t * top_k * row,
        },
    }
