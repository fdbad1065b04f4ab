"""Ring attention over one manual mesh axis, with its own ring backward.

Call ``ring_attention`` inside a ``shard_map`` body in which ``axis_name`` is
manual (``shardlib.parallel.seq_attention.dot_product_attention`` does this
for global arrays). Every device keeps its query block; key and value blocks
travel around the ring with ``ppermute`` and a running max and sum (blockwise
softmax) combine the partial results, so no device ever holds more than two
key/value blocks.

Token layout. With p devices the sequence is cut into 2p chunks and each
device holds two of them (``device_chunks``):
* ``zigzag``: device d holds chunks d and 2p-1-d. Under a causal mask every
  device then computes the same number of (query chunk, key chunk) tiles,
  2p+1, where a contiguous split makes the last device do 4p-1 and the first 3.
* ``none``: device d holds chunks 2d and 2d+1 (the plain contiguous split:
  what a ``shard_map`` of arrays in natural order gives).
Within a chunk tokens keep their original order. Callers store the sequence
in the layout's order (``token_order``) and give rotary embeddings the
original positions.

Masks. Causal without positions: by the layout, so positions never travel:
per ring step a device meets the two chunks of one other device and, for each
of its 2 x 2 (query chunk x, key chunk y) tiles, computes the full tile if
x > y, the causally masked tile if x == y, and nothing if x < y (a
``lax.cond`` on device-dependent chunk ids). Causal with positions (packed
documents restart them) and segment ids: the keys' positions and segment ids
travel with K and V ([B, M/p] int each), each tile is masked by them, and a
tile no query of which can see any key (by the chunks' position and segment
ranges) is skipped. Bidirectional: every tile is computed. An additive bias
is this device's query rows against every key, [B|1, H|1, L/p, M] (sharded
over the query length like q, whole over the key length, columns in the
stored order); each tile adds its [.., c, c] slice of the block it attends to,
and the backward returns the bias gradient of the same shape.

Memory: each tile runs over its keys in blocks of ``block_k`` (an inner
scan, flash-attention style), so scratch is [B, N, G, c, block_k]: linear in
the local length, not quadratic.

Communication: forward, p-1 sends of the local K and V ((p-1)/p of the whole
K and V per device); the send of the next block is issued before the current
block's tiles are computed and does not depend on them, so the two overlap.
Backward (``jax.custom_vjp``) runs the ring again from the saved q, k, v,
output and log-sum-exp (activation memory O(S/p) per device): K and V make
p-1 hops, their gradient accumulators travel with them and make p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from shardlib.parallel.ring_tiles import (
    DEFAULT_BLOCK_K,
    LAYOUTS,
    MASKED,
    Layout,
    Masks,
    RingSettings,
    Side,
    bias_blocks,
    bias_tile,
    block_size,
    carry_axes,
    check_layout,
    chunks_of,
    device_chunks,
    halves_kv,
    halves_q,
    halves_side,
    key_blocks,
    query_bias_rows,
    ring_position,
    row_stats,
    send_on,
    summed_to,
    tile_gate,
    tile_scores,
    token_order,
    varying_over,
    when,
)

__all__ = [
    "DEFAULT_BLOCK_K",
    "LAYOUTS",
    "Layout",
    "device_chunks",
    "ring_attention",
    "ring_attention_tiles",
    "token_order",
]


def _forward(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks: Masks, static: RingSettings):
    """(out [B, L, H, K] in q's dtype, lse halves [2 x [B, N, G, c]] float32, tiles computed (int32))."""
    axis_name, p, layout = static.axis_name, static.p, static.layout
    b, length, h, hd = q_BxLxHxK.shape
    kv_len, n = k_BxMxNxK.shape[1], k_BxMxNxK.shape[2]
    scale = hd**-0.5 if static.scale is None else static.scale
    me = ring_position(static)
    q_chunk = chunks_of(me, p, layout)
    qs, q_sides, bias_rows = halves_q(q_BxLxHxK, n), halves_side(masks.q), query_bias_rows(masks.bias)
    c, g = length // 2, h // n

    block = block_size(kv_len // 2, static.block_k)

    def key_block(acc, kv_j):
        o_BxCxNxGxK, m_BxNxGxC, l_BxNxGxC, q, diag, q_side = acc
        k, v, k_side, bias, j = kv_j
        s = tile_scores(q, k, diag, j * block, scale, q_side, k_side, bias, static.is_causal)
        m_new = jnp.maximum(m_BxNxGxC, jnp.max(s, axis=-1))
        correction = jnp.exp(m_BxNxGxC - m_new)
        probs = jnp.exp(s - m_new[..., None])
        l_new = l_BxNxGxC * correction + jnp.sum(probs, axis=-1)
        pv = jnp.einsum("bnglm,bmnk->blngk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (o_BxCxNxGxK * row_stats(correction) + pv, m_new, l_new, q, diag, q_side), None

    def tile(acc, q, q_side, k, v, k_side, bias, diag):
        # Rows that see no key of a block keep running statistics of the mask value; the first
        # block with a visible key rescales them by exp(MASKED - max) = 0, so they leave no trace.
        blocks = (
            key_blocks(k, block),
            key_blocks(v, block),
            jax.tree.map(lambda x: key_blocks(x, block), k_side),
            bias_blocks(bias, block),
            jnp.arange(k.shape[1] // block),
        )
        (o, m, l, *_), _ = jax.lax.scan(key_block, (*acc, q, diag, q_side), blocks)
        return o, m, l

    def visit(accs, tiles, k_cur, v_cur, k_side_cur, source):
        """Folds the key/value block that ``source`` owns into the running statistics."""
        kv_chunk = chunks_of(source, p, layout)
        ks, vs, k_sides = halves_kv(k_cur), halves_kv(v_cur), halves_side(k_side_cur)
        accs = list(accs)
        for a in range(2):
            for kb in range(2):
                gate, diag = tile_gate(static, q_chunk[a], kv_chunk[kb], q_sides[a], k_sides[kb])
                bias = bias_tile(bias_rows[a], source, kv_len, kb)
                accs[a] = when(
                    gate, tile, lambda acc, *_: acc, accs[a], qs[a], q_sides[a], ks[kb], vs[kb], k_sides[kb], bias, diag
                )
                tiles = tiles + jnp.asarray(gate, jnp.int32)
        return tuple(accs), tiles

    zero = (
        jnp.zeros((b, c, n, g, hd), jnp.float32),
        jnp.full((b, n, g, c), MASKED, jnp.float32),
        jnp.zeros((b, n, g, c), jnp.float32),
    )
    loop_axes = carry_axes(axis_name, q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks)
    accs, tiles = varying_over(loop_axes, ((zero, zero), jnp.zeros((), jnp.int32)))

    def step(carry, s):
        k_cur, v_cur, k_side_cur, accs, tiles = carry
        # Issued first and independent of this step's tiles: the transfer of
        # the next block overlaps the computation on the current one.
        k_next, v_next, k_side_next = send_on((k_cur, v_cur, k_side_cur), axis_name, p, static.stride)
        accs, tiles = visit(accs, tiles, k_cur, v_cur, k_side_cur, (me - s) % p)
        return (k_next, v_next, k_side_next, accs, tiles), None

    # p - 1 hops: the last block is used where it lands, never sent on.
    carry = (k_BxMxNxK, v_BxMxNxK, masks.kv, accs, tiles)
    (k_last, v_last, k_side_last, accs, tiles), _ = jax.lax.scan(step, carry, jnp.arange(p - 1))
    accs, tiles = visit(accs, tiles, k_last, v_last, k_side_last, (me - (p - 1)) % p)

    outs, lses = [], []
    for o_BxCxNxGxK, m_BxNxGxC, l_BxNxGxC in accs:
        outs.append(o_BxCxNxGxK / row_stats(l_BxNxGxC))
        lses.append(m_BxNxGxC + jnp.log(l_BxNxGxC))
    out_BxLxHxK = jnp.stack(outs, axis=1).reshape(b, length, h, hd).astype(q_BxLxHxK.dtype)
    return out_BxLxHxK, lses, tiles


def _bias_grad(ds_BxNxGxCxJ: jax.Array, bias_shape: tuple[int, ...]) -> jax.Array:
    """The scores' gradient summed to a bias block of ``bias_shape`` [B|1, H|1, c, j] (float32)."""
    bb, hb = bias_shape[:2]
    d = ds_BxNxGxCxJ if bb > 1 else jnp.sum(ds_BxNxGxCxJ, axis=0, keepdims=True)
    b, n, g, c, j = d.shape
    return d.reshape(b, n * g, c, j) if hb > 1 else jnp.sum(d, axis=(1, 2))[:, None]


def _backward(static: RingSettings, residuals, dout_BxLxHxK):
    q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, out_BxLxHxK, lses, masks = residuals
    axis_name, p, layout = static.axis_name, static.p, static.layout
    b, length, h, hd = q_BxLxHxK.shape
    kv_len, n = k_BxMxNxK.shape[1], k_BxMxNxK.shape[2]
    scale = hd**-0.5 if static.scale is None else static.scale
    me = ring_position(static)
    q_chunk = chunks_of(me, p, layout)
    qs, dos = halves_q(q_BxLxHxK, n), halves_q(dout_BxLxHxK, n)
    q_sides, bias_rows = halves_side(masks.q), query_bias_rows(masks.bias)
    # delta_i = sum_k dout_ik * out_ik: the softmax Jacobian's row term.
    deltas = [
        jnp.einsum("blngk,blngk->bngl", do, o, preferred_element_type=jnp.float32)
        for do, o in zip(dos, halves_q(out_BxLxHxK, n), strict=True)
    ]

    ck = kv_len // 2
    block = block_size(ck, static.block_k)
    loop_axes = carry_axes(axis_name, q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks, dout_BxLxHxK)

    def key_block(carry, kv_j):
        dq, q, do, lse, delta, diag, q_side = carry
        k, v, k_side, bias, j = kv_j
        s = tile_scores(q, k, diag, j * block, scale, q_side, k_side, bias, static.is_causal)
        probs = jnp.exp(s - lse[..., None])
        dp = jnp.einsum("blngk,bmnk->bnglm", do, v, preferred_element_type=jnp.float32)
        ds = probs * (dp - delta[..., None])
        ds_c, probs_c = ds.astype(q.dtype), probs.astype(do.dtype)
        dq = dq + scale * jnp.einsum("bnglm,bmnk->blngk", ds_c, k, preferred_element_type=jnp.float32)
        dk = scale * jnp.einsum("bnglm,blngk->bmnk", ds_c, q, preferred_element_type=jnp.float32)
        dv = jnp.einsum("bnglm,blngk->bmnk", probs_c, do, preferred_element_type=jnp.float32)
        dbias = None if bias is None else _bias_grad(ds, bias.shape)
        return (dq, q, do, lse, delta, diag, q_side), (dk, dv, dbias)

    def tile(grads, q, do, lse, delta, q_side, k, v, k_side, bias, diag):
        dq, dk, dv, _ = grads
        blocks = (
            key_blocks(k, block),
            key_blocks(v, block),
            jax.tree.map(lambda x: key_blocks(x, block), k_side),
            bias_blocks(bias, block),
            jnp.arange(ck // block),
        )
        (dq, *_), (dk_blocks, dv_blocks, dbias_blocks) = jax.lax.scan(
            key_block, (dq, q, do, lse, delta, diag, q_side), blocks
        )
        # [c/block, B, block, N, K] -> [B, c, N, K]
        dk = dk + jnp.moveaxis(dk_blocks, 0, 1).reshape(dk.shape)
        dv = dv + jnp.moveaxis(dv_blocks, 0, 1).reshape(dv.shape)
        # [c/block, B|1, H|1, c, block] -> [B|1, H|1, c, c_k]
        dbias = None if bias is None else jnp.moveaxis(dbias_blocks, 0, 3).reshape(bias.shape)
        return dq, dk, dv, dbias

    def visit(dqs, dbias_rows, k_cur, v_cur, k_side_cur, dk_cur, dv_cur, source):
        kv_chunk = chunks_of(source, p, layout)
        ks, vs, k_sides = halves_kv(k_cur), halves_kv(v_cur), halves_side(k_side_cur)
        dks, dvs = halves_kv(dk_cur), halves_kv(dv_cur)
        dqs, dbias_rows = list(dqs), list(dbias_rows)
        for a in range(2):
            for kb in range(2):
                gate, diag = tile_gate(static, q_chunk[a], kv_chunk[kb], q_sides[a], k_sides[kb])
                bias = bias_tile(bias_rows[a], source, kv_len, kb)
                zero_tile = None if bias is None else varying_over(loop_axes, jnp.zeros(bias.shape, jnp.float32))
                dqs[a], dks[kb], dvs[kb], dbias = when(
                    gate,
                    tile,
                    lambda grads, *_: grads,
                    (dqs[a], dks[kb], dvs[kb], zero_tile),
                    qs[a],
                    dos[a],
                    lses[a],
                    deltas[a],
                    q_sides[a],
                    ks[kb],
                    vs[kb],
                    k_sides[kb],
                    bias,
                    diag,
                )
                if dbias is not None:  # each (row chunk, key chunk) tile is visited once: set, not added
                    column = source * kv_len + kb * ck
                    dbias_rows[a] = jax.lax.dynamic_update_slice_in_dim(dbias_rows[a], dbias, column, axis=3)
        dk = jnp.stack(dks, axis=1).reshape(dk_cur.shape)
        dv = jnp.stack(dvs, axis=1).reshape(dv_cur.shape)
        return tuple(dqs), tuple(dbias_rows), dk, dv

    def step(carry, s):
        k_cur, v_cur, k_side_cur, dk_cur, dv_cur, dqs, dbias_rows = carry
        k_next, v_next, k_side_next = send_on(
            (k_cur, v_cur, k_side_cur), axis_name, p, static.stride
        )  # overlaps the tiles
        dqs, dbias_rows, dk_cur, dv_cur = visit(dqs, dbias_rows, k_cur, v_cur, k_side_cur, dk_cur, dv_cur, (me - s) % p)
        # The gradients of a key/value block travel with it.
        dk_next, dv_next = send_on((dk_cur, dv_cur), axis_name, p, static.stride)
        return (k_next, v_next, k_side_next, dk_next, dv_next, dqs, dbias_rows), None

    zeros_kv = jnp.zeros(k_BxMxNxK.shape, jnp.float32)
    zeros_q = jnp.zeros(qs[0].shape, jnp.float32)
    zeros_bias = tuple(None if r is None else jnp.zeros(r.shape, jnp.float32) for r in bias_rows)
    zeros = varying_over(loop_axes, (zeros_kv, (zeros_q, zeros_q), zeros_bias))
    carry = (k_BxMxNxK, v_BxMxNxK, masks.kv, zeros[0], zeros[0], zeros[1], zeros[2])
    (k_last, v_last, k_side_last, dk, dv, dqs, dbias_rows), _ = jax.lax.scan(step, carry, jnp.arange(p - 1))
    dqs, dbias_rows, dk, dv = visit(dqs, dbias_rows, k_last, v_last, k_side_last, dk, dv, (me - (p - 1)) % p)
    # One more hop brings every block's gradients home.
    dk, dv = send_on((dk, dv), axis_name, p, static.stride)
    dq_BxLxHxK = jnp.stack(dqs, axis=1).reshape(b, length, h, hd)
    dbias = None
    if masks.bias is not None:
        dbias = summed_to(jnp.concatenate(dbias_rows, axis=2), masks.bias).astype(masks.bias.dtype)
    no_grad = jax.tree.map(lambda _: None, (masks.q, masks.kv))
    grads = (
        summed_to(dq_BxLxHxK, q_BxLxHxK).astype(q_BxLxHxK.dtype),
        summed_to(dk, k_BxMxNxK).astype(k_BxMxNxK.dtype),
        summed_to(dv, v_BxMxNxK).astype(v_BxMxNxK.dtype),
    )
    return (*grads, Masks(dbias, *no_grad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, masks, static):
    return _forward(q, k, v, masks, static)[0]


def _ring_fwd(q, k, v, masks, static):
    out, lses, _ = _forward(q, k, v, masks, static)
    return out, (q, k, v, out, lses, masks)


_ring.defvjp(_ring_fwd, _backward)


def _check_shapes(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks: Masks, static: RingSettings) -> None:
    if q_BxLxHxK.ndim != 4 or k_BxMxNxK.shape != v_BxMxNxK.shape or k_BxMxNxK.ndim != 4:
        raise ValueError(
            f"ring attention wants q [B, L, H, K] and k, v [B, M, N, K]; got q {q_BxLxHxK.shape}, "
            f"k {k_BxMxNxK.shape}, v {v_BxMxNxK.shape}"
        )
    b, length, h, hd = q_BxLxHxK.shape
    kv_len = k_BxMxNxK.shape[1]
    if k_BxMxNxK.shape[0] != b or k_BxMxNxK.shape[3] != hd or h % k_BxMxNxK.shape[2]:
        raise ValueError(f"k/v shape {k_BxMxNxK.shape} does not fit q shape {q_BxLxHxK.shape}")
    if length % 2 or kv_len % 2:
        raise ValueError(
            f"the local query and key blocks ({length} and {kv_len} tokens) must each hold two equal chunks"
        )
    if static.is_causal and masks.q.positions is None and length != kv_len:
        raise ValueError(
            f"causal ring attention without positions masks by index, which needs as many queries as keys "
            f"(local blocks of {length} and {kv_len}); pass query_positions and key_positions"
        )
    if masks.bias is not None and masks.bias.shape[2:] != (length, static.p * kv_len):
        raise ValueError(
            f"ring attention's bias must be this device's query rows against every key, [.., {length}, "
            f"{static.p * kv_len}]; got {masks.bias.shape}"
        )


def ring_attention(
    q_BxLxHxK: jax.Array,
    k_BxMxNxK: jax.Array,
    v_BxMxNxK: jax.Array,
    bias_BxHxLxM: jax.Array | None = None,
    *,
    axis_name: str,
    axis_size: int,
    is_causal: bool = True,
    layout: Layout = "zigzag",
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    axis_stride: int = 1,
) -> jax.Array:
    """Grouped-query attention of this device's block against the whole ring; [B, L, H, K].

    Inside a shard_map where ``axis_name`` (size ``axis_size`` = p) is manual. q, k, v and the
    positions and segment ids (int [B, L], [B, M]) are this device's blocks of L (M) tokens,
    stored as ``layout`` says (``token_order``); query head h uses kv head h // (H/N).
    ``is_causal`` masks by the layout (no positions) or by the positions; segment ids keep
    attention within a segment; ``bias_BxHxLxM`` is [B|1, H|1, L, p * M]: this device's rows
    against every key in stored order. ``scale`` defaults to K ** -0.5. Softmax statistics are
    float32. Differentiable in q, k, v and the bias (ring backward). ``axis_stride`` = s > 1: the
    axis (of ``axis_size * s`` devices) holds s rings, the devices s apart (index i on ring i mod s,
    at place i // s): the hybrid's ring across Ulysses groups (``ulysses_attention``).
    """
    static, masks = _settings(
        axis_name, axis_size, is_causal, layout, block_k, scale, bias_BxHxLxM,
        query_positions, key_positions, query_segment_ids, key_segment_ids, axis_stride,
    )  # fmt: skip
    _check_shapes(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks, static)
    return _ring(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks, static)


def _settings(axis_name, p, is_causal, layout, block_k, scale, bias, q_pos, kv_pos, q_seg, kv_seg, stride=1):
    check_layout(layout)
    if (q_pos is None) != (kv_pos is None) or (q_seg is None) != (kv_seg is None):
        raise ValueError("ring attention takes positions (and segment ids) for both queries and keys, or neither")
    if not is_causal:  # positions only order tokens for a causal mask
        q_pos = kv_pos = None
    static = RingSettings(axis_name, int(p), layout, int(block_k), bool(is_causal), scale, int(stride))
    return static, Masks(bias, Side(q_pos, q_seg), Side(kv_pos, kv_seg))


def ring_attention_tiles(
    q_BxLxHxK: jax.Array,
    k_BxMxNxK: jax.Array,
    v_BxMxNxK: jax.Array,
    *,
    axis_name: str,
    axis_size: int,
    layout: Layout = "zigzag",
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """How many (c x c) causal attention tiles this device computed in the forward pass: int32 scalar.

    Counted by the same branch conditions that gate the computation, so it is
    what the kernel did; one tile costs 4 * B * c^2 * H * K FLOPs.
    """
    static, masks = _settings(axis_name, axis_size, True, layout, block_k, None, None, None, None, None, None)
    _check_shapes(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks, static)
    return _forward(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, masks, static)[2]
