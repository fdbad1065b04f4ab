"""Ulysses (all-to-all) attention over one manual mesh axis, and its hybrid with the ring.

Call ``ulysses_attention`` inside a ``shard_map`` body in which ``axis_name``
is manual (``shardlib.parallel.seq_attention.dot_product_attention`` does this
for global arrays, ``impl="ulysses"``). Each device holds a block of the
sequence for every head, [B, L/p, H, K]. One all-to-all per tensor over the
axis trades the sequence split for a head split: q, k and v become
[B, L, H/p, K], whole sequences of this device's heads; any attention kernel
runs on them unchanged (``attend``: the reference math by default, or
``jax.nn.dot_product_attention``, the fused kernel); a fourth all-to-all
trades the output back to [B, L/p, H, K]. The backward is autodiff: the
transpose of an all-to-all is the mirrored all-to-all, four more.

Bytes: an all-to-all of a [B, L/p, H, K] block sends (p-1)/p of it per
device, so the forward moves (p-1)/p of q, k, v and the output, each at the
local block's size: the volume per device shrinks as 1/p with more devices,
where the ring's stays (p-1)/p of the whole K and V.

Heads. The query heads (this device's, after any ``heads`` mesh axis) must
split over the Ulysses degree u. With fewer kv heads N than that (grouped
query attention), each kv head is repeated r = u / gcd(N, u) times before the
all-to-all (query head h then uses copy h // (H / (N r)), the same kv head),
which multiplies the k and v all-to-all bytes by r; the repeat's transpose
sums the copies' gradients.

The hybrid ("unified sequence parallelism"): ``degree`` u < p splits the axis
into p / u groups of u neighbouring indices (index i is in group i // u, rank
i mod u). The all-to-alls run within each group (``axis_index_groups``), so a
device then holds its group's block of L u / p tokens for H / u heads; the
ring attention then runs across the groups (``ring_attention``'s
``axis_stride=u``: the devices of equal rank, u indices apart) and the output
comes back by the group's all-to-all. The stored token order is the ring's
over the p / u groups (``token_order(L, p // u, layout)``), so zig-zag load
balance works as for the ring. One mesh axis carries both: no second mesh
axis and no change to the rules, so a pipeline stage's manual ``seq`` needs
nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from shardlib.parallel.dense_attention import gqa_attention
from shardlib.parallel.ring_attention import DEFAULT_BLOCK_K, Layout, ring_attention

Attend = Callable[..., jax.Array]
"""attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, bias, *, is_causal, query_positions, key_positions,
query_segment_ids, key_segment_ids, scale) -> [B, L, H, K]: attention on whole sequences."""


def kv_repeats(n_heads: int, n_kv_heads: int, degree: int) -> int:
    """How often each kv head is repeated so that the kv heads split over ``degree`` (1: none).

    Raises ``ValueError`` naming the head counts when the query heads do not split over ``degree``.
    """
    if n_heads % degree:
        fits = [d for d in range(degree - 1, 0, -1) if n_heads % d == 0 and degree % d == 0]
        raise ValueError(
            f"Ulysses attention splits the query heads over its degree, but {n_heads} query heads (per device, "
            f"after the heads axis) do not split over degree {degree}; use a Ulysses degree dividing both "
            f"(attention.ulysses_degree={fits[0]}, the ring across the rest) or impl=ring"
        )
    return degree // math.gcd(n_kv_heads, degree)


def groups_of(axis_size: int, degree: int) -> list[list[int]] | None:
    """The Ulysses groups of an axis: ``axis_size / degree`` runs of ``degree`` neighbouring indices."""
    if degree < 1 or axis_size % degree:
        raise ValueError(f"the Ulysses degree {degree} must divide the sequence axis's {axis_size} devices")
    if degree == axis_size:
        return None
    return [list(range(g * degree, (g + 1) * degree)) for g in range(axis_size // degree)]


def ulysses_attention(
    q_BxLxHxK: jax.Array,
    k_BxMxNxK: jax.Array,
    v_BxMxNxK: jax.Array,
    bias_BxHxLxM: jax.Array | None = None,
    *,
    axis_name: str,
    axis_size: int,
    degree: int | None = None,
    attend: Attend | None = None,
    is_causal: bool = True,
    layout: Layout = "none",
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """Grouped-query attention of this device's block by all-to-alls over ``axis_name``; [B, L, H, K].

    Inside a shard_map where ``axis_name`` (size ``axis_size`` = p) is manual; q, k, v, the
    positions and segment ids (int [B, L], [B, M]) are this device's blocks, contiguous in stored
    order. ``degree`` (default p): the Ulysses degree u; u < p is the hybrid, the ring across the
    p / u groups (module doc; ``layout`` and ``block_k`` are the ring's, ``attend`` must be None).
    ``attend``: the kernel on whole sequences (default ``gqa_attention``; see ``Attend``).
    ``is_causal`` masks by the positions when given, else by the stored index (``layout`` none for
    pure Ulysses). ``bias_BxHxLxM``: [B|1, H|1, L, p * M], this device's query rows against every
    key. Returns this device's block, in q's dtype.
    Raises ``ValueError``: heads that do not split over u (naming the counts), a zig-zag layout
    without the ring, ``attend`` with the hybrid.
    """
    p = int(axis_size)
    u = p if degree is None else int(degree)
    groups = groups_of(p, u)
    if groups is not None and attend is not None:
        raise ValueError("the hybrid (Ulysses degree below the axis size) runs the ring across groups: no attend")
    if groups is None and layout != "none":
        raise ValueError(f"layout={layout!r} orders the ring's blocks; pure Ulysses attends whole sequences (none)")
    repeats = kv_repeats(q_BxLxHxK.shape[2], k_BxMxNxK.shape[2], u)
    if repeats > 1:
        k_BxMxNxK = jnp.repeat(k_BxMxNxK, repeats, axis=2)
        v_BxMxNxK = jnp.repeat(v_BxMxNxK, repeats, axis=2)

    def to_heads(x_BxLxHxK):  # [B, L/p, H, K] -> [B, L u/p, H/u, K]
        return jax.lax.all_to_all(x_BxLxHxK, axis_name, 2, 1, tiled=True, axis_index_groups=groups)

    def gather(x_BxL, axis=1):  # a group's blocks of per-token ints (or bias rows), in order
        return jax.lax.all_gather(x_BxL, axis_name, axis=axis, tiled=True, axis_index_groups=groups)

    if bias_BxHxLxM is not None:
        by_head = bias_BxHxLxM.shape[1] > 1
        bias_BxHxLxM = (
            jax.lax.all_to_all(bias_BxHxLxM, axis_name, 1, 2, tiled=True, axis_index_groups=groups)
            if by_head
            else gather(bias_BxHxLxM, axis=2)
        )
    if not is_causal:
        query_positions = key_positions = None
    masks = {
        "query_positions": query_positions,
        "key_positions": key_positions,
        "query_segment_ids": query_segment_ids,
        "key_segment_ids": key_segment_ids,
    }
    masks = {name: None if x is None else gather(x) for name, x in masks.items()}
    q, k, v = to_heads(q_BxLxHxK), to_heads(k_BxMxNxK), to_heads(v_BxMxNxK)
    if groups is None:
        out_BxLxHxK = (attend or gqa_attention)(q, k, v, bias_BxHxLxM, is_causal=is_causal, scale=scale, **masks)
    else:
        out_BxLxHxK = ring_attention(
            q, k, v, bias_BxHxLxM, axis_name=axis_name, axis_size=p // u, axis_stride=u, is_causal=is_causal,
            layout=layout, scale=scale, block_k=block_k, **masks,
        )  # fmt: skip
    # [B, L u/p, H/u, K] -> [B, L/p, H, K]
    return jax.lax.all_to_all(out_BxLxHxK, axis_name, 1, 2, tiled=True, axis_index_groups=groups)
