"""Reference attention math on whole arrays: grouped-query heads, masks by position and segment, bias.

The plain formula, left to XLA: scores [B, N, G, L, M] are materialised. It is
what ``impl="dense"`` runs, what the all-gather kernel runs on a device's
queries against the gathered keys, and what ``shardlib.models.layers``'s
``causal_gqa_attention`` (the transformer's default) is.

Shape letters: B batch, L query length, M key length, H query heads, N kv
heads (H % N == 0), G = H / N query heads per kv head, K head dim. Query head
h uses kv head h // G (heads grouped N-major, as ``jax.nn.dot_product_attention``
groups them).

Masks. ``is_causal``: query i sees key j iff position(i) >= position(j), the
positions being ``query_positions``/``key_positions`` when given (packed
documents restart them) and the array indices otherwise. Segment ids: a
query sees only keys of its own segment. A query that sees no key at all
gets a uniform average of the values (its scores all equal the mask value),
as ``jax.nn.dot_product_attention`` gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)
"""The score of a masked (query, key) pair: large and finite, so no row of the softmax is NaN."""


def visible_mask(
    is_causal: bool,
    query_positions_BxL: jax.Array | None,
    key_positions_BxM: jax.Array | None,
    query_segment_ids_BxL: jax.Array | None = None,
    key_segment_ids_BxM: jax.Array | None = None,
) -> jax.Array | None:
    """bool [B, L, M] (or [1, L, M]): which keys each query sees; None where every key is visible.

    Causal masks compare positions (given, or the caller's indices); segment ids must be equal.
    """
    visible = None
    # The caller gives positions with is_causal, and segment ids in pairs (check_inputs).
    if is_causal:
        visible = query_positions_BxL[:, :, None] >= key_positions_BxM[:, None, :]  # type: ignore[index]
    if query_segment_ids_BxL is not None:
        same_segment_BxLxM = query_segment_ids_BxL[:, :, None] == key_segment_ids_BxM[:, None, :]  # type: ignore[index]
        visible = same_segment_BxLxM if visible is None else jnp.logical_and(visible, same_segment_BxLxM)
    return visible


def index_positions(length: int, start: jax.Array | int = 0) -> jax.Array:
    """int32 [1, length]: the indices start..start+length-1, as positions for an index-causal mask."""
    return (start + jnp.arange(length, dtype=jnp.int32))[None, :]


def gqa_attention(
    q_BxLxHxK: jax.Array,
    k_BxMxNxK: jax.Array,
    v_BxMxNxK: jax.Array,
    bias_BxHxLxM: jax.Array | None = None,
    *,
    is_causal: bool = False,
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention; returns [B, L, H, K] in q's dtype. Scores and softmax are float32.

    Args:
      q_BxLxHxK, k_BxMxNxK, v_BxMxNxK: queries, keys, values (H % N == 0).
      bias_BxHxLxM: added to the scaled scores; 4-D, each of its first two dimensions B (H) or 1.
      is_causal: mask by position (``query_positions``/``key_positions``, int [B, L]/[B, M]) when
        given, else by index (query i sees keys 0..i, as ``jax.nn.dot_product_attention``).
      query_segment_ids, key_segment_ids: int [B, L]/[B, M]; attention stays within a segment.
      scale: multiplies q.k (default K ** -0.5).
    """
    batch, q_len, n_heads, head_dim = q_BxLxHxK.shape
    n_kv_heads = k_BxMxNxK.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    group = n_heads // n_kv_heads
    q_BxLxNxGxK = q_BxLxHxK.reshape(batch, q_len, n_kv_heads, group, head_dim)

    scores_BxNxGxLxM = jnp.einsum("blngk,bmnk->bnglm", q_BxLxNxGxK, k_BxMxNxK, preferred_element_type=jnp.float32)
    scores_BxNxGxLxM = scores_BxNxGxLxM * (head_dim**-0.5 if scale is None else scale)
    if bias_BxHxLxM is not None:
        scores_BxNxGxLxM = scores_BxNxGxLxM + grouped_bias(bias_BxHxLxM, n_kv_heads)
    if is_causal and query_positions is None:
        query_positions, key_positions = index_positions(q_len), index_positions(k_BxMxNxK.shape[1])
    visible_BxLxM = visible_mask(is_causal, query_positions, key_positions, query_segment_ids, key_segment_ids)
    if visible_BxLxM is not None:
        scores_BxNxGxLxM = jnp.where(visible_BxLxM[:, None, None], scores_BxNxGxLxM, MASKED)
    probs_BxNxGxLxM = jax.nn.softmax(scores_BxNxGxLxM, axis=-1).astype(v_BxMxNxK.dtype)

    out_BxLxNxGxK = jnp.einsum("bnglm,bmnk->blngk", probs_BxNxGxLxM, v_BxMxNxK)
    return out_BxLxNxGxK.reshape(batch, q_len, n_heads, head_dim).astype(q_BxLxHxK.dtype)


def grouped_bias(bias_BxHxLxM: jax.Array, n_kv_heads: int) -> jax.Array:
    """A 4-D bias [B|1, H|1, L, M] as float32 [B|1, N|1, G|1, L, M], to add to grouped scores."""
    b, h, length, m = bias_BxHxLxM.shape
    groups = (n_kv_heads, h // n_kv_heads) if h > 1 else (1, 1)
    return bias_BxHxLxM.astype(jnp.float32).reshape(b, *groups, length, m)
