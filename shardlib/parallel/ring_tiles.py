"""The ring's pieces: token layouts, a tile's scores and masks, key blocks, loop typing.

``shardlib.parallel.ring_attention`` builds its forward and backward rings
from these; see its module doc for the algorithm. A tile is one local query
chunk (c tokens) against one chunk of a visiting key block; its keys are
taken ``block_k`` at a time.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shardlib.parallel.dense_attention import MASKED, grouped_bias, visible_mask

Layout = Literal["zigzag", "none"]
LAYOUTS: tuple[str, ...] = ("zigzag", "none")

DEFAULT_BLOCK_K = 256
"""Keys per inner block: a tile's scores are [B, N, G, c, block_k], linear in the chunk length c."""


class Side(NamedTuple):
    """Per-token mask inputs of queries or keys: int [B, n] each, or None (not used)."""

    positions: jax.Array | None = None
    segments: jax.Array | None = None


class Masks(NamedTuple):
    """What masks the scores besides the layout: an additive bias and the two sides' tokens."""

    bias: jax.Array | None = None  # [B|1, H|1, L, M]: this device's rows, every key
    q: Side = Side()
    kv: Side = Side()


class RingSettings(NamedTuple):
    axis_name: str
    p: int
    layout: Layout
    block_k: int
    is_causal: bool
    scale: float | None
    stride: int = 1  # the ring's devices are `stride` apart on the axis (several rings share it)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring attention layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def device_chunks(layout: Layout, p: int) -> np.ndarray:
    """[p, 2] int: the two chunk ids (of 2p, in sequence order) each device holds."""
    check_layout(layout)
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


def chunks_of(device: jax.Array, p: int, layout: Layout) -> tuple[jax.Array, jax.Array]:
    if layout == "zigzag":
        return device, 2 * p - 1 - device
    return 2 * device, 2 * device + 1


def halves_q(x_BxLxHxK: jax.Array, n_kv: int) -> list[jax.Array]:
    """[B, 2c, H, K] -> two [B, c, N, G, K] (one per local chunk, heads grouped by kv head)."""
    b, length, h, k = x_BxLxHxK.shape
    x = x_BxLxHxK.reshape(b, 2, length // 2, n_kv, h // n_kv, k)
    return [x[:, 0], x[:, 1]]


def halves_kv(x_BxLxNxK: jax.Array) -> list[jax.Array]:
    b, length, n, k = x_BxLxNxK.shape
    x = x_BxLxNxK.reshape(b, 2, length // 2, n, k)
    return [x[:, 0], x[:, 1]]


def halves_side(side: Side) -> list[Side]:
    """A side's [B, 2c] arrays as two sides of [B, c] (one per local chunk)."""
    halves = [jax.tree.map(lambda x, a=a: x.reshape(x.shape[0], 2, -1)[:, a], side) for a in range(2)]
    return [Side(*h) for h in halves]


def query_bias_rows(bias_BxHxLxM: jax.Array | None) -> list[jax.Array | None]:
    """The bias rows of each local query chunk: two [B|1, H|1, c, M]."""
    if bias_BxHxLxM is None:
        return [None, None]
    c = bias_BxHxLxM.shape[2] // 2
    return [bias_BxHxLxM[:, :, a * c : (a + 1) * c] for a in range(2)]


def bias_tile(rows_BxHxCxM, source, kv_len: int, kb: int):
    """[B|1, H|1, c, c_k]: the rows' columns of chunk ``kb`` of the key block ``source`` holds (stored order)."""
    if rows_BxHxCxM is None:
        return None
    ck = kv_len // 2
    return jax.lax.dynamic_slice_in_dim(rows_BxHxCxM, source * kv_len + kb * ck, ck, axis=3)


def row_stats(x_BxNxGxC: jax.Array) -> jax.Array:
    """Per-row statistics [B, N, G, c] -> [B, c, N, G, 1] to scale outputs laid out like q."""
    return jnp.transpose(x_BxNxGxC, (0, 3, 1, 2))[..., None]


def tile_scores(q_BxCxNxGxK, k_BxJxNxK, diag, offset, scale, q_side, k_side, bias_BxHxCxJ, is_causal):
    """Scaled float32 scores [B, N, G, c, j] of a chunk's queries against keys ``offset..offset+j`` of a chunk.

    ``diag`` (traced bool, or None when the layout does not mask): the keys are from the queries'
    own chunk, so the causal mask applies (query row r sees key offset + col iff r >= offset + col).
    The bias block is added and the sides' positions (causal) and segment ids mask.
    """
    s_BxNxGxCxJ = jnp.einsum("blngk,bmnk->bnglm", q_BxCxNxGxK, k_BxJxNxK, preferred_element_type=jnp.float32)
    s_BxNxGxCxJ = s_BxNxGxCxJ * scale
    if bias_BxHxCxJ is not None:
        s_BxNxGxCxJ = s_BxNxGxCxJ + grouped_bias(bias_BxHxCxJ, k_BxJxNxK.shape[2])
    visible_BxCxJ = visible_mask(
        is_causal and q_side.positions is not None, q_side.positions, k_side.positions, q_side.segments, k_side.segments
    )
    if diag is not None:
        c, j = q_BxCxNxGxK.shape[1], k_BxJxNxK.shape[1]
        causal_CxJ = jnp.arange(c)[:, None] >= offset + jnp.arange(j)[None, :]
        visible_CxJ = jnp.logical_or(causal_CxJ, jnp.logical_not(diag))
        if visible_BxCxJ is None:
            return jnp.where(visible_CxJ, s_BxNxGxCxJ, MASKED)
        visible_BxCxJ = jnp.logical_and(visible_BxCxJ, visible_CxJ)
    if visible_BxCxJ is None:
        return s_BxNxGxCxJ
    return jnp.where(visible_BxCxJ[:, None, None], s_BxNxGxCxJ, MASKED)


def tile_gate(static: RingSettings, x, y, q_side: Side, k_side: Side):
    """(compute?, diag) of the tile of query chunk x against key chunk y.

    compute: a traced bool, or True (every tile is computed). It is False only where no query of
    the tile can see any of its keys: a later chunk under the layout's causal mask, keys all after
    the queries by position, or segment ranges that do not meet. diag: see ``tile_scores``.
    """
    gate: bool | jax.Array = True
    diag: jax.Array | None = None
    # The two sides carry positions and segment ids alike (both or neither).
    if static.is_causal and q_side.positions is None:
        gate, diag = x >= y, x == y
    if static.is_causal and q_side.positions is not None:
        k_min = k_side.positions.min(axis=1)  # type: ignore[union-attr]
        gate = jnp.logical_and(gate, jnp.any(q_side.positions.max(axis=1) >= k_min))
    if q_side.segments is not None:
        qs, ks = q_side.segments, k_side.segments
        meet = jnp.logical_and(qs.max(axis=1) >= ks.min(axis=1), qs.min(axis=1) <= ks.max(axis=1))  # type: ignore[union-attr]
        gate = jnp.logical_and(gate, jnp.any(meet))
    return gate, diag


def when(gate, compute, skip, *operands):
    """``compute(*operands)`` where ``gate`` holds, else ``skip``; no conditional when gate is always True."""
    if gate is True:
        return compute(*operands)
    return jax.lax.cond(gate, compute, skip, *operands)


def key_blocks(x_BxCxNxK: jax.Array, block: int) -> jax.Array:
    """[B, c, ...] -> [c/block, B, block, ...]: the leading axis is scanned over."""
    b, c = x_BxCxNxK.shape[:2]
    return jnp.moveaxis(x_BxCxNxK.reshape(b, c // block, block, *x_BxCxNxK.shape[2:]), 1, 0)


def bias_blocks(bias_BxHxCxJ: jax.Array | None, block: int) -> jax.Array | None:
    """[B|1, H|1, c, c_k] -> [c_k/block, B|1, H|1, c, block]."""
    if bias_BxHxCxJ is None:
        return None
    b, h, c, ck = bias_BxHxCxJ.shape
    return jnp.moveaxis(bias_BxHxCxJ.reshape(b, h, c, ck // block, block), 3, 0)


def block_size(c: int, block_k: int) -> int:
    block = min(block_k, c)
    if c % block:
        raise ValueError(f"ring attention chunk of {c} tokens does not split into key blocks of block_k={block_k}")
    return block


def _varying_axes(x) -> frozenset[str]:
    """The manual axes ``x`` varies over (shard_map's ``check_vma`` typing; empty without it)."""
    aval = jax.typeof(x)
    vma: Any = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def varying_over(axes: frozenset[str], tree):
    """``tree``'s arrays typed as varying over ``axes`` (zeros that meet per-device data in a loop carry)."""
    if not axes:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, tuple(sorted(axes - _varying_axes(x))), to="varying"), tree)


def carry_axes(axis_name: str, *trees) -> frozenset[str]:
    """The axes a loop carry varies over: the inputs' and the ring's (none where nothing is typed)."""
    axes = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves(trees)))
    return axes | {axis_name} if axes else axes


def summed_to(ct, primal):
    """A cotangent summed over the axes it varies over and its primal does not (the transpose of pcast)."""
    extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


def _ring_perm(p: int, stride: int) -> list[tuple[int, int]]:
    return [(i, (i + stride) % (p * stride)) for i in range(p * stride)]


def ring_position(static: RingSettings) -> jax.Array:
    """This device's place on its ring: its axis index // stride (rings of ``p``, ``stride`` of them)."""
    return jax.lax.axis_index(static.axis_name) // static.stride


def send_on(tree, axis_name: str, p: int, stride: int = 1):
    """Every array of ``tree`` to the next device of its ring (``stride`` axis indices on: ``p`` of them)."""
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, _ring_perm(p, stride)), tree)
