"""All-gather attention over one manual mesh axis: each device's queries against every key.

Call ``allgather_attention`` inside a ``shard_map`` body in which ``axis_name``
is manual (``shardlib.parallel.seq_attention.dot_product_attention`` does this
for global arrays). K and V (and the keys' positions and segment ids, when
given) are all-gathered over the axis; the reference math
(``shardlib.parallel.dense_attention.gqa_attention``) then runs on the local
queries. The same bytes as the ring ((p-1)/p of K and V per device), but every
device holds the whole sequence's K and V, and the backward is plain autodiff
(the gather's transpose is a reduce-scatter of dK and dV).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from shardlib.parallel.dense_attention import gqa_attention, index_positions
from shardlib.parallel.ring_attention import Layout, token_order


def allgather_attention(
    q_BxLxHxK: jax.Array,
    k_BxMxNxK: jax.Array,
    v_BxMxNxK: jax.Array,
    bias_BxHxLxM: jax.Array | None = None,
    *,
    axis_name: str,
    axis_size: int,
    is_causal: bool = True,
    layout: Layout = "none",
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    float32_gradients: bool = False,
) -> jax.Array:
    """This device's queries against the whole sequence's keys; [B, L, H, K] (L, M local lengths).

    Inside a shard_map where ``axis_name`` (size ``axis_size`` = p) is manual; every argument is
    this device's block. ``is_causal`` masks by the positions when given, else by the original
    index of each stored token (``layout``: ``none`` for a contiguous split, ``zigzag`` for
    ``ring_attention``'s order). ``bias_BxHxLxM`` is [B|1, H|1, L, p * M]: this device's query rows
    against every key. ``float32_gradients``: K and V's gradients are reduce-scattered in float32
    (only a lower precision changes anything). For the kernel inside a partial-manual region (a
    pipeline stage): there XLA:CPU aborts compiling the bfloat16 reduce-scatter that transposes
    the gather (hlo_instruction.cc "Invalid binary instruction opcode copy", from
    ChangeOpDataType's CloneAllReduce); the forward gather keeps the compute dtype.
    """
    gather = functools.partial(_gather_f32_transpose, axis_name) if float32_gradients else _plain_gather(axis_name)
    local_len, kv_len = q_BxLxHxK.shape[1], k_BxMxNxK.shape[1]
    if bias_BxHxLxM is not None and bias_BxHxLxM.shape[2:] != (local_len, axis_size * kv_len):
        raise ValueError(
            f"all-gather attention's bias must be this device's query rows against every key, "
            f"[.., {local_len}, {axis_size * kv_len}]; got {bias_BxHxLxM.shape}"
        )
    if is_causal and query_positions is None:
        query_positions, key_positions = _index_positions(axis_name, axis_size, layout, local_len, kv_len)
    elif is_causal:  # positions come in pairs (check_inputs)
        key_positions = _plain_gather(axis_name)(key_positions)  # type: ignore[arg-type]
    else:
        query_positions = key_positions = None
    if key_segment_ids is not None:
        key_segment_ids = _plain_gather(axis_name)(key_segment_ids)
    return gqa_attention(
        q_BxLxHxK,
        gather(k_BxMxNxK),
        gather(v_BxMxNxK),
        bias_BxHxLxM,
        is_causal=is_causal,
        query_positions=query_positions,
        key_positions=key_positions,
        query_segment_ids=query_segment_ids,
        key_segment_ids=key_segment_ids,
        scale=scale,
    )


def _index_positions(axis_name: str, p: int, layout: Layout, local_len: int, kv_len: int):
    """([1, L] this device's queries', [1, p * M] every key's) original indices under ``layout``."""
    me = jax.lax.axis_index(axis_name)
    if layout == "none":
        return index_positions(local_len, me * local_len), index_positions(p * kv_len)
    if local_len != kv_len:
        raise ValueError(f"layout={layout!r} orders queries and keys alike: it needs L == M, got {local_len}, {kv_len}")
    order = jnp.asarray(token_order(p * kv_len, p, layout))
    return jax.lax.dynamic_slice_in_dim(order, me * local_len, local_len)[None], order[None]


def _plain_gather(axis: str) -> Callable[[jax.Array], jax.Array]:
    return lambda x_BxM: jax.lax.all_gather(x_BxM, axis, axis=1, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_f32_transpose(axis: str, x_BxMxNxK: jax.Array) -> jax.Array:
    """All-gather over ``axis`` along the length; its transpose (a reduce-scatter) runs in float32."""
    return jax.lax.all_gather(x_BxMxNxK, axis, axis=1, tiled=True)


def _gather_forward(axis, x_BxMxNxK):
    return _gather_f32_transpose(axis, x_BxMxNxK), None


def _gather_backward(axis, _, d_all_BxMxNxK):
    d_BxMxNxK = jax.lax.psum_scatter(d_all_BxMxNxK.astype(jnp.float32), axis, scatter_dimension=1, tiled=True)
    return (d_BxMxNxK.astype(d_all_BxMxNxK.dtype),)


_gather_f32_transpose.defvjp(_gather_forward, _gather_backward)
