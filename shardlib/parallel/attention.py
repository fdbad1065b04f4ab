"""Attention over a sequence sharded on the mesh: dense, ring or all-gather K/V.

The model calls an ``AttentionFn`` (``shardlib.models.layers``) on global arrays and
never names a mesh axis. ``make_attention`` resolves the logical names
through the rules (``length`` -> the ring axis, ``batch``/``heads``/``kv_heads``
-> whatever the preset says) and wraps the chosen kernel in a ``shard_map``
that is manual over every mesh axis: attention is independent per batch row
and per head, so the only communication is over the sequence axis.

* ``dense``: ``shardlib.models.layers.causal_gqa_attention``, left to the compiler
  (what every run did before this module existed).
* ``fused``: ``jax.nn.dot_product_attention`` with ``is_causal``: on GPUs in
  bf16, cuDNN's fused (flash) kernel, which never materialises the [L, M]
  scores; elsewhere XLA's own implementation. Natural token order only (the
  training step's positions 0..L-1), so no sequence sharding.
* ``ring``: ``shardlib.parallel.ring_attention``: K/V blocks rotate, O(S/p) memory.
* ``allgather``: each device all-gathers K and V over the sequence axis and
  attends its queries to all of them, masking by position. The same bytes
  as the ring ((p-1)/p of K and V per device), but every device holds the
  whole sequence's K and V, and the backward is plain autodiff.

With ``load_balance: zigzag`` the training step stores every sequence in
zig-zag order (``AttentionPlan.order``) so the ring's causal work is equal on
every device; the loss is a mean over tokens, so the order does not change it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from shardlib.models.layers import causal_gqa_attention
from shardlib.core.rules import rule_axes
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.ring_attention import DEFAULT_BLOCK_K, ring_attention, token_order

AttentionFn = Callable[..., jax.Array]
IMPLS = ("dense", "fused", "ring", "allgather")

_Q_AXES = ("batch", "length", "heads", "head_dim")
_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
_POS_AXES = ("batch", "length")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What the training step needs: the attention function and the token order.

    fn(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM) -> [B, L, H, K]
    order: [seq_len] original position of each stored token, or None (natural order).
    local: the same attention on a device's own block of every sequence ([B, L/seq, ...], stored
      order), for callers already inside a ``shard_map`` that makes the sequence axis manual (the
      pipeline's stages): the kernel without ``fn``'s own shard_map. Dense attention runs there as
      the all-gather kernel (what XLA makes of it over ``seq``). None: no such kernel (fused).
    """

    fn: AttentionFn
    order: np.ndarray | None = None
    local: AttentionFn | None = None


def sequence_axis(shard: ActivationSharding) -> str:
    """The mesh axis the rules put the ``length`` dimension on (even when it has size 1)."""
    axes = rule_axes(shard.rules, "length")
    if not axes:
        raise ValueError("the sharding rules map `length` to no mesh axis; ring attention needs one (length -> seq)")
    if len(axes) != 1:
        raise ValueError(f"ring attention runs over one mesh axis, but the rules map `length` to {axes}")
    (axis,) = axes
    if axis not in shard.mesh.shape:
        raise ValueError(f"the rules map `length` to mesh axis {axis!r}, which the mesh does not have")
    return axis


def _manual(shard: ActivationSharding, body: Callable, in_axes, out_axes) -> Callable:
    """``body`` on local blocks, in a shard_map manual over every mesh axis; specs from the rules."""

    def run(*arrays):
        in_specs = tuple(shard.spec(x.shape, names) for x, names in zip(arrays, in_axes, strict=True))
        out_spec = shard.spec(arrays[0].shape, out_axes)  # the output has q's shape
        return jax.shard_map(body, mesh=shard.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*arrays)

    return run


def make_attention(
    impl: str,
    load_balance: str,
    shard: ActivationSharding,
    seq_len: int | None = None,
    block_k: int = DEFAULT_BLOCK_K,
) -> AttentionPlan:
    """The attention function and token order for ``impl`` on ``shard``'s mesh and rules.

    ``seq_len`` (when given) is checked against the sequence axis: it must
    split into 2 * seq equal chunks, each a whole number of ``block_k`` key
    blocks (ring). Errors name the culprit.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if load_balance not in ("zigzag", "none"):
        raise ValueError(f"unknown attention load_balance {load_balance!r}; expected zigzag or none")
    if impl == "fused":
        if int(shard.mesh.shape[sequence_axis(shard)]) > 1:
            raise ValueError("attention.impl=fused needs the whole sequence on each device; with seq > 1 use ring")
        return AttentionPlan(fused_causal_attention)
    if impl == "dense":
        if _sequence_size(shard) == 1:
            return AttentionPlan(causal_gqa_attention, local=causal_gqa_attention)
        # seq > 1: left to XLA, in natural order; inside a manual region, the all-gather kernel.
        return AttentionPlan(causal_gqa_attention, local=_gather_kernel(sequence_axis(shard), float32_gradients=True))
    axis = sequence_axis(shard)
    p = int(shard.mesh.shape[axis])
    order = None
    if seq_len is not None:
        if seq_len % (2 * p):
            raise ValueError(
                f"seq_len={seq_len} must be divisible by 2 x {axis}={2 * p} for attention.impl={impl} "
                f"(each device holds two equal chunks of the sequence)"
            )
        chunk = seq_len // (2 * p)
        if impl == "ring" and chunk % min(block_k, chunk):
            raise ValueError(
                f"attention.block_k={block_k} does not divide the ring's chunks of seq_len / (2 x {axis}) = "
                f"{chunk} tokens"
            )
        if load_balance == "zigzag" and p > 1:
            order = token_order(seq_len, p, "zigzag")
    layout = load_balance
    gather_body = _gather_kernel(axis)

    if impl == "ring":

        def ring_body(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL=None, kv_positions_BxM=None):
            # The kernel masks by the layout; positions only drive the rotary embedding.
            del q_positions_BxL, kv_positions_BxM
            return ring_attention(
                q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, axis_name=axis, axis_size=p, layout=layout, block_k=block_k
            )

        ring = _manual(shard, ring_body, (_Q_AXES, _KV_AXES, _KV_AXES), _Q_AXES)

        def attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM):
            del q_positions_BxL, kv_positions_BxM
            return ring(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK)

        return AttentionPlan(attend, order, local=ring_body)

    gathered = _manual(shard, gather_body, (_Q_AXES, _KV_AXES, _KV_AXES, _POS_AXES, _POS_AXES), _Q_AXES)
    return AttentionPlan(gathered, order, local=_gather_kernel(axis, float32_gradients=True))


def _gather_kernel(axis: str, float32_gradients: bool = False) -> AttentionFn:
    """All-gather attention on local blocks, ``axis`` manual: each device's queries against every K/V block.

    ``float32_gradients``: K and V's gradients are reduce-scattered in float32 (only a lower
    precision changes anything). For the kernel inside a partial-manual region (a pipeline stage):
    there XLA:CPU aborts compiling the bfloat16 reduce-scatter that transposes the gather
    (hlo_instruction.cc "Invalid binary instruction opcode copy", from ChangeOpDataType's
    CloneAllReduce); the forward gather keeps the compute dtype.
    """
    gather = functools.partial(_gather_f32_transpose, axis) if float32_gradients else _plain_gather(axis)

    def gather_body(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM):
        kv_pos_all = jax.lax.all_gather(kv_positions_BxM, axis, axis=1, tiled=True)
        return causal_gqa_attention(q_BxLxHxK, gather(k_BxMxNxK), gather(v_BxMxNxK), q_positions_BxL, kv_pos_all)

    return gather_body


def _plain_gather(axis: str) -> Callable[[jax.Array], jax.Array]:
    return lambda x_BxMxNxK: jax.lax.all_gather(x_BxMxNxK, axis, axis=1, tiled=True)


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


def _sequence_size(shard: ActivationSharding) -> int:
    """Devices the ``length`` dimension is split over (1 where the rules or the mesh leave it whole)."""
    axes = rule_axes(shard.rules, "length")
    return int(np.prod([shard.mesh.shape[a] for a in axes if a in shard.mesh.shape]))


def fused_causal_attention(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM) -> jax.Array:
    """Causal GQA attention through ``jax.nn.dot_product_attention`` (cuDNN flash on GPUs in bf16/fp16).

    The mask is the diagonal one (``is_causal``): positions are assumed to be
    0..L-1 in order, as the training step passes them without a zig-zag order.
    """
    del q_positions_BxL, kv_positions_BxM
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, is_causal=True)
