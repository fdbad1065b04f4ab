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
* ``ulysses``: ``shardlib.parallel.ulysses_attention``: all-to-alls over the
  sequence axis give every device whole sequences of H/seq heads, on which
  ``ulysses_kernel`` (dense or fused) runs causal by index (natural order);
  ``ulysses_degree`` u < seq is the hybrid: all-to-alls within groups of u
  devices and the ring across the seq/u groups (its layout: ``load_balance``
  over seq/u).

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
    detail: how the impl splits the work where its name does not say (Ulysses' degree), or "".
    """

    fn: AttentionFn
    order: np.ndarray | None = None
    local: AttentionFn | None = None
    detail: str = ""


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
    ulysses_degree: int | None = None,
    ulysses_kernel: str = "dense",
) -> AttentionPlan:
    """The attention function and token order for ``impl`` on ``shard``'s mesh and rules.

    ``seq_len`` (when given) is checked against the sequence axis: it must
    split into 2 * seq equal chunks, each a whole number of ``block_k`` key
    blocks (ring). Errors name the culprit. Every impl is
    ``dot_product_attention(..., is_causal=True, impl=impl, rules=shard)``; ``ulysses_degree``
    (None: the whole sequence axis) and ``ulysses_kernel`` are ``ulysses``'s.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if load_balance not in ("zigzag", "none"):
        raise ValueError(f"unknown attention load_balance {load_balance!r}; expected zigzag or none")
    axis = sequence_axis(shard) if impl in _SPLIT else length_axis(shard.rules, shard.mesh)
    p = 1 if axis is None else int(shard.mesh.shape[axis])
    if impl == "fused" and p > 1:
        raise ValueError("attention.impl=fused needs the whole sequence on each device; with seq > 1 use ring")
    if impl != "ulysses" and (ulysses_degree is not None or ulysses_kernel != "dense"):
        raise ValueError(f"attention.ulysses_degree and ulysses_kernel are impl=ulysses settings, not impl={impl}'s")
    ring = p // _degree(ulysses_degree, p, axis) if impl == "ulysses" else p
    order = None
    if seq_len is not None and impl in _SPLIT:
        assert axis is not None  # sequence_axis gave it (ring, allgather, ulysses)
        order = _checked_order(impl, load_balance, axis, p, seq_len, block_k, ring)
    settings = {"is_causal": True, "impl": impl, "rules": shard}

    if impl in ("fused", "ring", "ulysses"):  # natural order or the ring's layout: positions only drive RoPE
        if impl == "ring" or (impl == "ulysses" and ring > 1):
            settings |= {"layout": load_balance, "block_k": block_k}
        if impl == "ulysses":
            settings |= {"ulysses_degree": p // ring, "ulysses_kernel": ulysses_kernel}

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

    detail = ""
    if impl == "ulysses" and p > 1:
        kernel = f"the ring across {ring} groups" if ring > 1 else f"{ulysses_kernel} kernel"
        detail = f"all-to-alls over {axis}={p} in groups of {p // ring}, {kernel}"
    return AttentionPlan(attend, order, local=attend, detail=detail)


_SPLIT = ("ring", "allgather", "ulysses")  # the impls that split the sequence over the `length` axis


def _degree(ulysses_degree: int | None, p: int, axis: str | None) -> int:
    """The Ulysses degree (default: the whole sequence axis), checked against the axis's p devices."""
    degree = p if ulysses_degree is None else ulysses_degree
    if degree < 1 or p % degree:
        divisors = [d for d in range(1, p + 1) if p % d == 0]
        raise ValueError(
            f"attention.ulysses_degree={ulysses_degree} must divide {axis}={p} (one of {divisors}): the all-to-alls "
            f"run within groups of that many devices, the ring across the groups"
        )
    return degree


def _checked_order(impl: str, load_balance: str, axis: str, p: int, seq_len: int, block_k: int, ring: int):
    """The zig-zag token order (None for natural order), after checking ``seq_len`` fits the axis.

    ``ring``: the ring's devices (p, or p / ulysses_degree for the hybrid; 1: pure Ulysses)."""
    if impl == "ulysses":
        return _checked_ulysses_order(load_balance, axis, p, seq_len, block_k, ring)
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


def _checked_ulysses_order(load_balance: str, axis: str, p: int, seq_len: int, block_k: int, ring: int):
    """Pure Ulysses: natural order, ``seq_len`` split over p; the hybrid: the ring's over its ``ring`` groups."""
    if seq_len % p:
        raise ValueError(f"seq_len={seq_len} must be divisible by {axis}={p} for attention.impl=ulysses")
    if ring == 1:
        return None
    if seq_len % (2 * ring):
        raise ValueError(
            f"seq_len={seq_len} must be divisible by 2 x {axis}/ulysses_degree = {2 * ring} for the hybrid "
            f"(the ring across {ring} Ulysses groups holds two equal chunks per group)"
        )
    chunk = seq_len // (2 * ring)
    if chunk % min(block_k, chunk):
        raise ValueError(f"attention.block_k={block_k} does not divide the hybrid ring's chunks of {chunk} tokens")
    return token_order(seq_len, ring, "zigzag") if load_balance == "zigzag" else None
