"""Causal ring attention over one manual mesh axis, with its own ring backward.

Call ``ring_attention`` inside a ``shard_map`` body in which ``axis_name`` is
manual (``shardlib.parallel.attention`` does this for the model). Every device keeps its
query block; key and value blocks travel around the ring with ``ppermute``
and a running max and sum (blockwise softmax) combine the partial results, so
no device ever holds more than two key/value blocks.

Token layout. With p devices the sequence is cut into 2p chunks of c tokens
and each device holds two of them (``device_chunks``):
* ``zigzag``: device d holds chunks d and 2p-1-d. Under a causal mask every
  device then computes the same number of (query chunk, key chunk) tiles,
  2p+1, where a contiguous split makes the last device do 4p-1 and the first 3.
* ``none``: device d holds chunks 2d and 2d+1 (the plain contiguous split).
Within a chunk tokens keep their original order. Callers store the sequence
in the layout's order (``token_order``) and give rotary embeddings the
original positions; the kernel derives its causal mask from the layout, so
positions never travel around the ring.

Per ring step a device meets the two chunks of one other device: for each of
its 2 x 2 (query chunk x, key chunk y) tiles it computes the full tile if
x > y, the causally masked tile if x == y, and nothing if x < y (a
``lax.cond`` on device-dependent chunk ids).

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
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Layout = Literal["zigzag", "none"]
LAYOUTS: tuple[str, ...] = ("zigzag", "none")

_NEG = float(jnp.finfo(jnp.float32).min)
DEFAULT_BLOCK_K = 256
"""Keys per inner block: a tile's scores are [B, N, G, c, block_k], linear in the chunk length c."""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring attention layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def device_chunks(layout: Layout, p: int) -> np.ndarray:
    """[p, 2] int: the two chunk ids (of 2p, in sequence order) each device holds."""
    _check_layout(layout)
    d = np.arange(p)
    if layout == "zigzag":
        return np.stack([d, 2 * p - 1 - d], axis=1)
    return np.stack([2 * d, 2 * d + 1], axis=1)


def token_order(seq_len: int, p: int, layout: Layout) -> np.ndarray:
    """[seq_len] int32: original position of each stored token (device 0's tokens first).

    ``tokens[:, token_order(...)]`` puts a batch in the layout's order; the
    same array is the rotary positions of the stored tokens.
    """
    if seq_len % (2 * p):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2 * seq = {2 * p} for ring attention")
    c = seq_len // (2 * p)
    chunks = device_chunks(layout, p).reshape(-1)
    return (chunks[:, None] * c + np.arange(c)[None, :]).reshape(-1).astype(np.int32)


def _chunks_of(device: jax.Array, p: int, layout: Layout) -> tuple[jax.Array, jax.Array]:
    if layout == "zigzag":
        return device, 2 * p - 1 - device
    return 2 * device, 2 * device + 1


def _halves_q(x_BxLxHxK: jax.Array, n_kv: int) -> list[jax.Array]:
    """[B, 2c, H, K] -> two [B, c, N, G, K] (one per local chunk, heads grouped by kv head)."""
    b, length, h, k = x_BxLxHxK.shape
    x = x_BxLxHxK.reshape(b, 2, length // 2, n_kv, h // n_kv, k)
    return [x[:, 0], x[:, 1]]


def _halves_kv(x_BxLxNxK: jax.Array) -> list[jax.Array]:
    b, length, n, k = x_BxLxNxK.shape
    x = x_BxLxNxK.reshape(b, 2, length // 2, n, k)
    return [x[:, 0], x[:, 1]]


def _rows(x_BxNxGxC: jax.Array) -> jax.Array:
    """Per-row statistics [B, N, G, c] -> [B, c, N, G, 1] to scale outputs laid out like q."""
    return jnp.transpose(x_BxNxGxC, (0, 3, 1, 2))[..., None]


def _scores(q_BxCxNxGxK, k_BxJxNxK, diag, offset, scale):
    """Scaled float32 scores [B, N, G, c, j] of a chunk's queries against keys ``offset..offset+j`` of a chunk.

    ``diag`` (traced bool): the keys are from the queries' own chunk, so the
    causal mask applies (query row r sees key offset + col iff r >= offset + col).
    """
    s_BxNxGxCxJ = jnp.einsum("blngk,bmnk->bnglm", q_BxCxNxGxK, k_BxJxNxK, preferred_element_type=jnp.float32)
    s_BxNxGxCxJ = s_BxNxGxCxJ * scale
    c, j = q_BxCxNxGxK.shape[1], k_BxJxNxK.shape[1]
    causal_CxJ = jnp.arange(c)[:, None] >= offset + jnp.arange(j)[None, :]
    visible_CxJ = jnp.logical_or(causal_CxJ, jnp.logical_not(diag))
    return jnp.where(visible_CxJ, s_BxNxGxCxJ, _NEG)


def _key_blocks(x_BxCxNxK: jax.Array, block: int) -> jax.Array:
    """[B, c, N, K] -> [c/block, B, block, N, K]: the leading axis is scanned over."""
    b, c, n, k = x_BxCxNxK.shape
    return jnp.moveaxis(x_BxCxNxK.reshape(b, c // block, block, n, k), 1, 0)


def _block_size(c: int, block_k: int) -> int:
    block = min(block_k, c)
    if c % block:
        raise ValueError(f"ring attention chunk of {c} tokens does not split into key blocks of block_k={block_k}")
    return block


def _ring_perm(p: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % p) for i in range(p)]


def _forward(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, axis_name: str, p: int, layout: Layout, block_k: int):
    """(out [B, L, H, K] in q's dtype, lse halves [2 x [B, N, G, c]] float32, tiles computed (int32))."""
    b, length, h, hd = q_BxLxHxK.shape
    n = k_BxLxNxK.shape[2]
    scale = hd**-0.5
    me = jax.lax.axis_index(axis_name)
    q_chunk = _chunks_of(me, p, layout)
    qs = _halves_q(q_BxLxHxK, n)
    c, g = length // 2, h // n

    block = _block_size(c, block_k)

    def key_block(acc, kv_j):
        o_BxCxNxGxK, m_BxNxGxC, l_BxNxGxC, q, diag = acc
        k, v, j = kv_j
        s = _scores(q, k, diag, j * block, scale)
        m_new = jnp.maximum(m_BxNxGxC, jnp.max(s, axis=-1))
        correction = jnp.exp(m_BxNxGxC - m_new)
        probs = jnp.exp(s - m_new[..., None])
        l_new = l_BxNxGxC * correction + jnp.sum(probs, axis=-1)
        pv = jnp.einsum("bnglm,bmnk->blngk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (o_BxCxNxGxK * _rows(correction) + pv, m_new, l_new, q, diag), None

    def tile(acc, q, k, v, diag):
        # Key blocks in order: the first holds key 0 of the chunk, which every
        # query row of a diagonal tile sees, so the running max is finite from then on.
        blocks = (_key_blocks(k, block), _key_blocks(v, block), jnp.arange(c // block))
        (o, m, l, _, _), _ = jax.lax.scan(key_block, (*acc, q, diag), blocks)
        return o, m, l

    def visit(accs, tiles, k_BxLxNxK, v_BxLxNxK, source):
        """Folds the key/value block that ``source`` owns into the running statistics."""
        kv_chunk = _chunks_of(source, p, layout)
        ks, vs = _halves_kv(k_BxLxNxK), _halves_kv(v_BxLxNxK)
        accs = list(accs)
        for a in range(2):
            for kb in range(2):
                x, y = q_chunk[a], kv_chunk[kb]
                accs[a] = jax.lax.cond(
                    x >= y,
                    lambda acc, q, k, v, d: tile(acc, q, k, v, d),
                    lambda acc, *_: acc,
                    accs[a],
                    qs[a],
                    ks[kb],
                    vs[kb],
                    x == y,
                )
                tiles = tiles + (x >= y).astype(jnp.int32)
        return tuple(accs), tiles

    zero = (
        jnp.zeros((b, c, n, g, hd), jnp.float32),
        jnp.full((b, n, g, c), _NEG, jnp.float32),
        jnp.zeros((b, n, g, c), jnp.float32),
    )
    accs, tiles = (zero, zero), jnp.zeros((), jnp.int32)

    def step(carry, s):
        k_cur, v_cur, accs, tiles = carry
        # Issued first and independent of this step's tiles: the transfer of
        # the next block overlaps the computation on the current one.
        k_next = jax.lax.ppermute(k_cur, axis_name, _ring_perm(p))
        v_next = jax.lax.ppermute(v_cur, axis_name, _ring_perm(p))
        accs, tiles = visit(accs, tiles, k_cur, v_cur, (me - s) % p)
        return (k_next, v_next, accs, tiles), None

    # p - 1 hops: the last block is used where it lands, never sent on.
    (k_last, v_last, accs, tiles), _ = jax.lax.scan(step, (k_BxLxNxK, v_BxLxNxK, accs, tiles), jnp.arange(p - 1))
    accs, tiles = visit(accs, tiles, k_last, v_last, (me - (p - 1)) % p)

    outs, lses = [], []
    for o_BxCxNxGxK, m_BxNxGxC, l_BxNxGxC in accs:
        outs.append(o_BxCxNxGxK / _rows(l_BxNxGxC))
        lses.append(m_BxNxGxC + jnp.log(l_BxNxGxC))
    out_BxLxHxK = jnp.stack(outs, axis=1).reshape(b, length, h, hd).astype(q_BxLxHxK.dtype)
    return out_BxLxHxK, lses, tiles


def _backward(axis_name: str, p: int, layout: Layout, block_k: int, residuals, dout_BxLxHxK):
    q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, out_BxLxHxK, lses = residuals
    b, length, h, hd = q_BxLxHxK.shape
    n = k_BxLxNxK.shape[2]
    scale = hd**-0.5
    me = jax.lax.axis_index(axis_name)
    q_chunk = _chunks_of(me, p, layout)
    qs, dos = _halves_q(q_BxLxHxK, n), _halves_q(dout_BxLxHxK, n)
    # delta_i = sum_k dout_ik * out_ik: the softmax Jacobian's row term.
    deltas = [
        jnp.einsum("blngk,blngk->bngl", do, o, preferred_element_type=jnp.float32)
        for do, o in zip(dos, _halves_q(out_BxLxHxK, n), strict=True)
    ]

    c = length // 2
    block = _block_size(c, block_k)

    def key_block(carry, kv_j):
        dq, q, do, lse, delta, diag = carry
        k, v, j = kv_j
        s = _scores(q, k, diag, j * block, scale)
        probs = jnp.exp(s - lse[..., None])
        dp = jnp.einsum("blngk,bmnk->bnglm", do, v, preferred_element_type=jnp.float32)
        ds = probs * (dp - delta[..., None])
        ds_c, probs_c = ds.astype(q.dtype), probs.astype(do.dtype)
        dq = dq + scale * jnp.einsum("bnglm,bmnk->blngk", ds_c, k, preferred_element_type=jnp.float32)
        dk = scale * jnp.einsum("bnglm,blngk->bmnk", ds_c, q, preferred_element_type=jnp.float32)
        dv = jnp.einsum("bnglm,blngk->bmnk", probs_c, do, preferred_element_type=jnp.float32)
        return (dq, q, do, lse, delta, diag), (dk, dv)

    def tile(grads, q, do, lse, delta, k, v, diag):
        dq, dk, dv = grads
        blocks = (_key_blocks(k, block), _key_blocks(v, block), jnp.arange(c // block))
        (dq, *_), (dk_blocks, dv_blocks) = jax.lax.scan(key_block, (dq, q, do, lse, delta, diag), blocks)
        # [c/block, B, block, N, K] -> [B, c, N, K]
        dk = dk + jnp.moveaxis(dk_blocks, 0, 1).reshape(dk.shape)
        dv = dv + jnp.moveaxis(dv_blocks, 0, 1).reshape(dv.shape)
        return dq, dk, dv

    def visit(dqs, k_cur, v_cur, dk_cur, dv_cur, source):
        kv_chunk = _chunks_of(source, p, layout)
        ks, vs = _halves_kv(k_cur), _halves_kv(v_cur)
        dks, dvs = _halves_kv(dk_cur), _halves_kv(dv_cur)
        dqs = list(dqs)
        for a in range(2):
            for kb in range(2):
                x, y = q_chunk[a], kv_chunk[kb]
                dqs[a], dks[kb], dvs[kb] = jax.lax.cond(
                    x >= y,
                    tile,
                    lambda grads, *_: grads,
                    (dqs[a], dks[kb], dvs[kb]),
                    qs[a],
                    dos[a],
                    lses[a],
                    deltas[a],
                    ks[kb],
                    vs[kb],
                    x == y,
                )
        return tuple(dqs), jnp.stack(dks, axis=1).reshape(dk_cur.shape), jnp.stack(dvs, axis=1).reshape(dv_cur.shape)

    perm = _ring_perm(p)

    def step(carry, s):
        k_cur, v_cur, dk_cur, dv_cur, dqs = carry
        k_next = jax.lax.ppermute(k_cur, axis_name, perm)  # overlaps this step's tiles
        v_next = jax.lax.ppermute(v_cur, axis_name, perm)
        dqs, dk_cur, dv_cur = visit(dqs, k_cur, v_cur, dk_cur, dv_cur, (me - s) % p)
        # The gradients of a key/value block travel with it.
        dk_next = jax.lax.ppermute(dk_cur, axis_name, perm)
        dv_next = jax.lax.ppermute(dv_cur, axis_name, perm)
        return (k_next, v_next, dk_next, dv_next, dqs), None

    zeros_kv = jnp.zeros(k_BxLxNxK.shape, jnp.float32)
    zeros_q = jnp.zeros(qs[0].shape, jnp.float32)
    carry = (k_BxLxNxK, v_BxLxNxK, zeros_kv, zeros_kv, (zeros_q, zeros_q))
    (k_last, v_last, dk, dv, dqs), _ = jax.lax.scan(step, carry, jnp.arange(p - 1))
    dqs, dk, dv = visit(dqs, k_last, v_last, dk, dv, (me - (p - 1)) % p)
    # One more hop brings every block's gradients home.
    dk = jax.lax.ppermute(dk, axis_name, perm)
    dv = jax.lax.ppermute(dv, axis_name, perm)
    dq_BxLxHxK = jnp.stack(dqs, axis=1).reshape(b, length, h, hd)
    return dq_BxLxHxK.astype(q_BxLxHxK.dtype), dk.astype(k_BxLxNxK.dtype), dv.astype(v_BxLxNxK.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ring(q, k, v, axis_name, p, layout, block_k):
    return _forward(q, k, v, axis_name, p, layout, block_k)[0]


def _ring_fwd(q, k, v, axis_name, p, layout, block_k):
    out, lses, _ = _forward(q, k, v, axis_name, p, layout, block_k)
    return out, (q, k, v, out, lses)


_ring.defvjp(_ring_fwd, _backward)


def _check_shapes(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK) -> None:
    if q_BxLxHxK.ndim != 4 or k_BxLxNxK.shape != v_BxLxNxK.shape or k_BxLxNxK.ndim != 4:
        raise ValueError(
            f"ring attention wants q [B, L, H, K] and k, v [B, L, N, K]; got q {q_BxLxHxK.shape}, "
            f"k {k_BxLxNxK.shape}, v {v_BxLxNxK.shape}"
        )
    b, length, h, hd = q_BxLxHxK.shape
    if k_BxLxNxK.shape[:2] != (b, length) or k_BxLxNxK.shape[3] != hd or h % k_BxLxNxK.shape[2]:
        raise ValueError(f"k/v shape {k_BxLxNxK.shape} does not fit q shape {q_BxLxHxK.shape}")
    if length % 2:
        raise ValueError(f"the local sequence block ({length} tokens) must hold two equal chunks")


def ring_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxNxK: jax.Array,
    v_BxLxNxK: jax.Array,
    *,
    axis_name: str,
    axis_size: int,
    layout: Layout = "zigzag",
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """Causal grouped-query attention of this device's block against the whole ring; [B, L, H, K].

    Inside a shard_map where ``axis_name`` (size ``axis_size`` = p) is manual.
    Every argument is this device's block of L = S/p tokens, stored as
    ``layout`` says (see ``token_order``); query head h uses kv head h // (H/N).
    Softmax statistics are float32. Differentiable (ring backward).
    """
    _check_layout(layout)
    _check_shapes(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK)
    return _ring(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, axis_name, axis_size, layout, block_k)


def ring_attention_tiles(
    q_BxLxHxK: jax.Array,
    k_BxLxNxK: jax.Array,
    v_BxLxNxK: jax.Array,
    *,
    axis_name: str,
    axis_size: int,
    layout: Layout = "zigzag",
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """How many (c x c) attention tiles this device computed in the forward pass: int32 scalar.

    Counted by the same branch conditions that gate the computation, so it is
    what the kernel did; one tile costs 4 * B * c^2 * H * K FLOPs.
    """
    _check_layout(layout)
    _check_shapes(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK)
    return _forward(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, axis_name, axis_size, layout, block_k)[2]
