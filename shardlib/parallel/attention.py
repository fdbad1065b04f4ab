"""The transformer's attention over a sequence sharded on the mesh: dense, fused, ring or all-gather K/V.

The model calls an ``AttentionFn`` (``shardlib.models.layers``) on global arrays and
never names a mesh axis. ``make_attention`` binds the public entry point,
``shardlib.parallel.seq_attention.dot_product_attention`` (the one a foreign
model calls), to the model's settings: causal, ``rules=`` the run's
``ActivationSharding`` (``length`` -> the sequence axis, ``batch``/``heads``/
``kv_heads`` -> whatever the preset says), the ring's layout and block size.
There is no other path: the same function runs on global arrays in the jitted
step (its own ``shard_map``, manual over every mesh axis: attention is
independent per batch row and per head, so the only communication is over the
sequence axis) and on a device's blocks inside a pipeline stage (the sequence
axis manual, told from the context).

* ``dense``: the reference math (``shardlib.parallel.dense_attention``), left to the
  compiler (what every run did before this module existed), masking by position.
* ``fused``: ``jax.nn.dot_product_attention`` with ``is_causal``: on GPUs in
  bf16, cuDNN's fused (flash) kernel, which never materialises the [L, M]
  scores; elsewhere XLA's own implementation. Natural token order only (the
  training step's positions 0..L-1), so no sequence sharding.
* ``ring``: ``shardlib.parallel.ring_attention``: K/V blocks rotate, O(S/p) memory,
  causal by the layout (positions only drive the rotary embedding).
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
from collections.abc import Callable

import jax
import numpy as np

from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.ring_attention import DEFAULT_BLOCK_K, token_order
from shardlib.parallel.seq_attention import IMPLS, dot_product_attention, length_axis

AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What the training step needs: the attention function and the token order.

    fn(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM) -> [B, L, H, K]
    order: [seq_len] original position of each stored token, or None (natural order).
    local: the same attention on a device's own block of every sequence ([B, L/seq, ...], stored
      order), for callers already inside a ``shard_map`` that makes the sequence axis manual (the
      pipeline's stages). ``make_attention`` gives ``fn`` itself: ``dot_product_attention`` tells
      the two contexts apart (dense runs there as the all-gather kernel, what XLA makes of it
      over ``seq``). None: no such kernel (``fn`` is then called, on a sequence of one device).
    """

    fn: AttentionFn
    order: np.ndarray | None = None
    local: AttentionFn | None = None


def sequence_axis(shard: ActivationSharding) -> str:
    """The mesh axis the rules put the ``length`` dimension on (even when it has size 1)."""
    axis = length_axis(shard.rules, shard.mesh)
    if axis is None:
        raise ValueError("the sharding rules map `length` to no mesh axis; ring attention needs one (length -> seq)")
    return axis


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
    blocks (ring). Errors name the culprit. Every impl is
    ``dot_product_attention(..., is_causal=True, impl=impl, rules=shard)``.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if load_balance not in ("zigzag", "none"):
        raise ValueError(f"unknown attention load_balance {load_balance!r}; expected zigzag or none")
    axis = sequence_axis(shard) if impl in ("ring", "allgather") else length_axis(shard.rules, shard.mesh)
    p = 1 if axis is None else int(shard.mesh.shape[axis])
    if impl == "fused" and p > 1:
        raise ValueError("attention.impl=fused needs the whole sequence on each device; with seq > 1 use ring")
    order = None
    if seq_len is not None and impl in ("ring", "allgather"):
        assert axis is not None  # sequence_axis gave it (ring, allgather)
        order = _checked_order(impl, load_balance, axis, p, seq_len, block_k)
    settings = {"is_causal": True, "impl": impl, "rules": shard}

    if impl in ("fused", "ring"):  # natural order (fused) or the layout's (ring): positions only drive RoPE
        if impl == "ring":
            settings |= {"layout": load_balance, "block_k": block_k}

        def attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM):
            del q_positions_BxL, kv_positions_BxM
            return dot_product_attention(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, **settings)

    else:  # dense, allgather: masked by position

        def attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM):
            return dot_product_attention(
                q_BxLxHxK,
                k_BxMxNxK,
                v_BxMxNxK,
                query_positions=q_positions_BxL,
                key_positions=kv_positions_BxM,
                **settings,
            )

    return AttentionPlan(attend, order, local=attend)


def _checked_order(impl: str, load_balance: str, axis: str, p: int, seq_len: int, block_k: int):
    """The zig-zag token order (None for natural order), after checking ``seq_len`` fits the axis."""
    if seq_len % (2 * p):
        raise ValueError(
            f"seq_len={seq_len} must be divisible by 2 x {axis}={2 * p} for attention.impl={impl} "
            f"(each device holds two equal chunks of the sequence)"
        )
    chunk = seq_len // (2 * p)
    if impl == "ring" and chunk % min(block_k, chunk):
        raise ValueError(
            f"attention.block_k={block_k} does not divide the ring's chunks of seq_len / (2 x {axis}) = {chunk} tokens"
        )
    if load_balance == "zigzag" and p > 1:
        return token_order(seq_len, p, "zigzag")
    return None
