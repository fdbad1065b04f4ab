"""Collectives written out as rings of ``ppermute`` steps, for use inside ``jax.shard_map``.

Every function here runs inside a ``shard_map`` body and works over one named
mesh axis, or a tuple of axes treated as one linearised axis (as ``jax.lax``
does). Only ``jax.lax.ppermute`` moves data between devices; everything else is
local slicing, adding and selecting. Each result matches a ``jax.lax``
collective exactly for integers (and up to summation order for floats):

==========================  ==================================================  ===========================
ring function               lax counterpart                                     bytes sent per device
==========================  ==================================================  ===========================
``ring_all_gather``         ``all_gather(x, ax, axis=, tiled=)``                (N-1)/N of the result
``ring_reduce_scatter``     ``psum_scatter(x, ax, scatter_dimension=, tiled=)``  (N-1)/N of the input
``ring_all_reduce``         ``psum(x, ax)``                                     2(N-1)/N of x
``bidirectional_all_reduce``  ``psum(x, ax)``                                   2(N-1)/N of x, half each way
``ring_all_to_all``         ``all_to_all(x, ax, split, concat, tiled=)``        (N-1)/N of x
``ring_broadcast``          ``psum(where(i == root, x, 0), ax)``                2(N-1)/N of x
``ring_scatter``            ``psum_scatter(where(i == root, x, 0), ax, tiled)``  (N-1)/N of x
``ring_gather``             ``where(i == root, all_gather(x, ax, tiled), 0)``   (N-1)/N of the result
``ring_reduce``             ``where(i == root, psum(x, ax), 0)``                2(N-1)/N of x
==========================  ==================================================  ===========================

N is the axis size. These are the bandwidth-optimal volumes: a device must
receive (N-1)/N of an all-gather's result, and an all-reduce is a
reduce-scatter plus an all-gather. Every step sends one block of 1/N of the
array to the next device of the ring (``i -> i+1``; ``bidirectional_all_reduce``
also uses ``i -> i-1``). Rooted results (``ring_gather``, ``ring_reduce``)
are zeros on the other devices, so every device returns the same shape.
Arrays whose size does not divide by N (all-reduce, broadcast, reduce) are
flattened and zero-padded to a multiple of N; the padding travels too.

Steps: ``unroll=True`` (the default) writes the N-1 steps as a Python loop, so
the compiled HLO holds N-1 ``collective-permute`` ops per ring; XLA can
schedule each step's local add next to the following transfer, and the
program is easy to audit. (Block offsets depend on the device's ring position,
so they are dynamic slices in both forms.) ``unroll=False`` uses
``lax.fori_loop``: the HLO holds one ``collective-permute`` inside a ``while``
whose ``known_trip_count`` is N-1 (``shardlib.analysis.hlo`` multiplies it back), and
the program size no longer grows with N,
which is what to pick for axes of hundreds of devices. The bytes on the wire
are identical. ``ring_all_to_all`` is always unrolled: step s sends directly to
the device s places ahead, and ``ppermute``'s permutation must be static.

``on_mesh`` applies any of these to a global array holding one local array per
device, for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

AxisName = str | tuple[str, ...]


# --------------------------------------------------------------------------- helpers


def _size(axis_name: AxisName) -> int:
    return lax.axis_size(axis_name)


def _shift(x, axis_name: AxisName, n: int, shift: int):
    """Every device sends ``x`` (an array or pytree) to the device ``shift`` places ahead on the ring.

    Floats narrower than 32 bits travel bitcast to unsigned integers of the
    same width: XLA:CPU otherwise widens a bf16 collective-permute to f32
    (float normalization), doubling the bytes on the wire. Elsewhere the
    bitcast is free.
    """
    perm = [(j, (j + shift) % n) for j in range(n)]

    def send(a):
        if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4:
            as_bits = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
            return lax.bitcast_convert_type(
                lax.ppermute(lax.bitcast_convert_type(a, as_bits), axis_name, perm), a.dtype
            )
        return lax.ppermute(a, axis_name, perm)

    return jax.tree.map(send, x)


def _take(blocks_NxB: jax.Array, index) -> jax.Array:
    """Block ``index`` (Python int or traced scalar, taken mod N) of a [N, ...] stack."""
    n = blocks_NxB.shape[0]
    if isinstance(index, int):
        return blocks_NxB[index % n]
    return lax.dynamic_index_in_dim(blocks_NxB, index % n, 0, keepdims=False)


def _put(blocks_NxB: jax.Array, block: jax.Array, index) -> jax.Array:
    n = blocks_NxB.shape[0]
    if isinstance(index, int):
        return blocks_NxB.at[index % n].set(block)
    return lax.dynamic_update_index_in_dim(blocks_NxB, block, index % n, 0)


def _steps(count: int, body: Callable, carry, unroll: bool):
    """``carry = body(t, carry)`` for t = 1..count, unrolled or as a ``fori_loop``."""
    if unroll:
        for t in range(1, count + 1):
            carry = body(t, carry)
        return carry
    return lax.fori_loop(1, count + 1, body, carry)


def _me(axis_name: AxisName):
    """This device's ring position: a traced scalar, since it differs per device."""
    return lax.axis_index(axis_name)


def _split_blocks(x: jax.Array, axis: int, n: int) -> jax.Array:
    """[..., n*c, ...] -> [n, ..., c, ...]: block j is the j-th slice of ``axis``."""
    if x.shape[axis] % n:
        raise ValueError(f"dimension {axis} of shape {x.shape} does not divide into {n} blocks")
    c = x.shape[axis] // n
    x = x.reshape(x.shape[:axis] + (n, c) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _join_blocks(blocks: jax.Array, axis: int) -> jax.Array:
    """Inverse of ``_split_blocks``: [n, ..., c, ...] -> [..., n*c, ...]."""
    x = jnp.moveaxis(blocks, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _flat_blocks(x: jax.Array, n: int) -> jax.Array:
    """Any shape -> [n, ceil(size/n)], zero-padded at the end."""
    flat = x.reshape(-1)
    pad = (-flat.size) % n
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(n, -1)


def _unflat(blocks_NxK: jax.Array, like: jax.Array) -> jax.Array:
    return blocks_NxK.reshape(-1)[: like.size].reshape(like.shape)


def _normal_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return axis % ndim


# --------------------------------------------------------------------------- ring kernels on [N, ...] block stacks


def _reduce_scatter_lanes(lanes: Sequence[tuple[jax.Array, int]], axis_name: AxisName, unroll: bool):
    """Ring reduce-scatter of several [N, ...] block stacks at once, each in its own direction.

    lanes: (blocks, direction) pairs, direction +1 (send to i+1) or -1. All
    lanes advance in the same N-1 steps, so a bidirectional ring sends both
    halves concurrently. Returns, per lane, the sum over devices of block i on
    device i.

    Lane with direction s: device i starts from its block i-s, and at step t
    adds its own block i-s-s*t to the partial sum received from i-s; after
    N-1 steps the partial sum it holds is block i-sN = i, complete.
    """
    n = _size(axis_name)
    me = _me(axis_name)
    accs = tuple(_take(blocks, me - s) for blocks, s in lanes)

    def step(t, accs):
        received = tuple(_shift(acc, axis_name, n, s) for acc, (_, s) in zip(accs, lanes, strict=True))
        return tuple(r + _take(blocks, me - s - s * t) for r, (blocks, s) in zip(received, lanes, strict=True))

    return _steps(n - 1, step, accs, unroll)


def _all_gather_lanes(lanes: Sequence[tuple[jax.Array, int]], axis_name: AxisName, unroll: bool):
    """Ring all-gather of several blocks at once: each lane (block, direction) -> [N, ...] stack.

    Device i holds block i; at step t it receives from i-s the block that
    started on device i-s*t and forwards it at the next step.
    """
    n = _size(axis_name)
    me = _me(axis_name)
    # Start from the local block broadcast to N slots: derived from the input,
    # so it carries the input's varying-axes type inside shard_map.
    outs = tuple(_put(jnp.broadcast_to(block, (n,) + block.shape), block, me) for block, _ in lanes)
    curs = tuple(block for block, _ in lanes)

    def step(t, carry):
        curs, outs = carry
        curs = tuple(_shift(c, axis_name, n, s) for c, (_, s) in zip(curs, lanes, strict=True))
        outs = tuple(_put(o, c, me - s * t) for o, c, (_, s) in zip(outs, curs, lanes, strict=True))
        return curs, outs

    _, outs = _steps(n - 1, step, (curs, outs), unroll)
    return outs


def _scatter_blocks(blocks_NxB: jax.Array, axis_name: AxisName, root: int, unroll: bool) -> jax.Array:
    """Pipelined ring scatter: device i gets block i of the root's [N, ...] stack.

    At step t the root sends the block of device root-t (the farthest one not
    yet sent, N-t hops away) and every other device forwards what it received
    at step t-1; at step N-1 every device receives its own block.
    """
    n = _size(axis_name)
    me = _me(axis_name)
    is_root = me == root
    buf = _take(blocks_NxB, me)  # a placeholder of the right type; overwritten before use off the root

    def step(t, buf):
        send = jnp.where(is_root, _take(blocks_NxB, root - t), buf)
        return _shift(send, axis_name, n, 1)

    buf = _steps(n - 1, step, buf, unroll)
    return jnp.where(is_root, _take(blocks_NxB, root), buf)


def _gather_blocks(block: jax.Array, axis_name: AxisName, root: int, unroll: bool) -> jax.Array:
    """Pipelined ring gather to the root: [...] per device -> [N, ...] on the root, zeros elsewhere.

    Every device sends its own block at step 1 and forwards what it received
    afterwards, so the root receives the block of device root-t at step t.
    """
    n = _size(axis_name)
    me = _me(axis_name)
    out = jnp.broadcast_to(block, (n,) + block.shape)

    def step(t, carry):
        cur, out = carry
        cur = _shift(cur, axis_name, n, 1)
        return cur, _put(out, cur, root - t)

    _, out = _steps(n - 1, step, (block, out), unroll)
    return jnp.where(me == root, out, jnp.zeros_like(out))


# --------------------------------------------------------------------------- public collectives


def ring_all_gather(
    x: jax.Array, axis_name: AxisName, *, axis: int = 0, tiled: bool = False, unroll: bool = True
) -> jax.Array:
    """``lax.all_gather`` as a one-directional ring.

    x: [...] per device. Returns, on every device, the N arrays stacked on a new
    dimension ``axis`` ([..., N, ...]), or concatenated along ``axis`` when
    ``tiled`` ([..., N*d, ...]).
    Volume: N-1 steps of |x| each, (N-1)·|x| = (N-1)/N of the result per device.
    """
    (stack,) = _all_gather_lanes([(x, 1)], axis_name, unroll)
    if tiled:
        return _join_blocks(stack, _normal_axis(axis, x.ndim))
    return jnp.moveaxis(stack, 0, _normal_axis(axis, x.ndim + 1))


def ring_reduce_scatter(
    x: jax.Array, axis_name: AxisName, *, scatter_dimension: int = 0, tiled: bool = False, unroll: bool = True
) -> jax.Array:
    """``lax.psum_scatter`` as a one-directional ring: device i gets the sum of every device's block i.

    x: [..., N*c, ...] per device (``tiled``; [..., N, ...] otherwise), split into
    N blocks along ``scatter_dimension``. Returns [..., c, ...] (``tiled``) or
    the block with that dimension removed. Partial sums accumulate in x's dtype.
    Volume: N-1 steps of one block, (N-1)/N·|x| per device.
    """
    dim = _normal_axis(scatter_dimension, x.ndim)
    n = _size(axis_name)
    if not tiled and x.shape[dim] != n:
        raise ValueError(f"untiled reduce-scatter needs dimension {dim} of {x.shape} to equal the axis size {n}")
    (block,) = _reduce_scatter_lanes([(_split_blocks(x, dim, n), 1)], axis_name, unroll)
    return block if tiled else jnp.squeeze(block, dim)


def ring_all_reduce(x: jax.Array, axis_name: AxisName, *, unroll: bool = True) -> jax.Array:
    """``lax.psum`` as a ring reduce-scatter followed by a ring all-gather (one direction).

    x: any shape; flattened and padded to N equal blocks. Returns the sum, same shape.
    Volume: 2(N-1) steps of |x|/N, 2(N-1)/N·|x| per device.
    """
    n = _size(axis_name)
    blocks = _flat_blocks(x, n)
    (block,) = _reduce_scatter_lanes([(blocks, 1)], axis_name, unroll)
    (stack,) = _all_gather_lanes([(block, 1)], axis_name, unroll)
    return _unflat(stack, x)


def bidirectional_all_reduce(x: jax.Array, axis_name: AxisName, *, unroll: bool = True) -> jax.Array:
    """``lax.psum`` with the array split in two halves that go round the ring in opposite directions.

    The first half reduce-scatters and all-gathers towards i+1, the second
    towards i-1, in the same steps: each step sends two messages of |x|/(2N),
    one per direction, so on a ring of full-duplex links each link direction
    carries half the traffic of ``ring_all_reduce`` and the step takes half as
    long. Volume per device is unchanged: 2(N-1)/N·|x| in total,
    (N-1)/N·|x| each way, in 2(N-1) steps of two collective-permutes.
    """
    n = _size(axis_name)
    halves = _flat_blocks(x, 2 * n).reshape(2, n, -1)
    fwd, bwd = _reduce_scatter_lanes([(halves[0], 1), (halves[1], -1)], axis_name, unroll)
    fwd, bwd = _all_gather_lanes([(fwd, 1), (bwd, -1)], axis_name, unroll)
    return _unflat(jnp.stack([fwd, bwd]), x)


def ring_all_to_all(
    x: jax.Array, axis_name: AxisName, split_axis: int, concat_axis: int, *, tiled: bool = False
) -> jax.Array:
    """``lax.all_to_all``: block j of ``split_axis`` goes to device j; received blocks join along ``concat_axis``.

    x: [..., N*c, ...] per device (``tiled``), or N along ``split_axis`` (untiled:
    that dimension is removed and the N received blocks are stacked on a new
    ``concat_axis``), as in ``lax.all_to_all``. Step s = 1..N-1 sends block
    i+s directly to device i+s (a ring shift by s), so it is always unrolled.
    Volume: N-1 steps of one block, (N-1)/N·|x| per device, the minimum, since
    only the own block stays.
    """
    n = _size(axis_name)
    split = _normal_axis(split_axis, x.ndim)
    if not tiled and x.shape[split] != n:
        raise ValueError(f"untiled all-to-all needs dimension {split} of {x.shape} to equal the axis size {n}")
    blocks = _split_blocks(x, split, n)  # [N, ..., c, ...]
    me = _me(axis_name)
    received = _put(blocks, _take(blocks, me), me)  # own block in place; the others are overwritten
    for s in range(1, n):
        block = _shift(_take(blocks, me + s), axis_name, n, s)  # arrives from device me-s
        received = _put(received, block, me - s)
    if tiled:
        return _join_blocks(received, _normal_axis(concat_axis, x.ndim))
    received = jnp.squeeze(received, split + 1)  # [N, ...] with split removed
    return jnp.moveaxis(received, 0, _normal_axis(concat_axis, x.ndim))


def ring_broadcast(x: jax.Array, axis_name: AxisName, root: int = 0, *, unroll: bool = True) -> jax.Array:
    """Every device gets the root's x: a ring scatter from the root, then a ring all-gather.

    x: any shape (only the root's is read). Pipelined this way, no device sends
    more than 2(N-1)/N·|x|, against (N-1)·|x| for forwarding whole copies:
    the bandwidth-optimal broadcast for large arrays (van de Geijn).
    Volume: 2(N-1) steps of |x|/N, 2(N-1)/N·|x| per device.
    """
    n = _size(axis_name)
    block = _scatter_blocks(_flat_blocks(x, n), axis_name, root, unroll)
    (stack,) = _all_gather_lanes([(block, 1)], axis_name, unroll)
    return _unflat(stack, x)


def ring_scatter(
    x: jax.Array, axis_name: AxisName, root: int = 0, *, axis: int = 0, tiled: bool = True, unroll: bool = True
) -> jax.Array:
    """Device i gets block i of the root's x along ``axis`` (pipelined ring from the root).

    x: [..., N*c, ...] (only the root's is read); returns [..., c, ...], or the
    block with ``axis`` removed when not ``tiled`` (x then has N there).
    Volume: N-1 steps of |x|/N, (N-1)/N·|x| per device (all the root must send).
    """
    dim = _normal_axis(axis, x.ndim)
    n = _size(axis_name)
    if not tiled and x.shape[dim] != n:
        raise ValueError(f"untiled scatter needs dimension {dim} of {x.shape} to equal the axis size {n}")
    block = _scatter_blocks(_split_blocks(x, dim, n), axis_name, root, unroll)
    return block if tiled else jnp.squeeze(block, dim)


def ring_gather(
    x: jax.Array, axis_name: AxisName, root: int = 0, *, axis: int = 0, tiled: bool = True, unroll: bool = True
) -> jax.Array:
    """The root gets every device's x, concatenated along ``axis`` (stacked there if not ``tiled``).

    Other devices return zeros of the same shape. Pipelined ring towards the root.
    Volume: N-1 steps of |x|, (N-1)/N of the result per device (all the root must receive).
    """
    stack = _gather_blocks(x, axis_name, root, unroll)
    if tiled:
        return _join_blocks(stack, _normal_axis(axis, x.ndim))
    return jnp.moveaxis(stack, 0, _normal_axis(axis, x.ndim + 1))


def ring_reduce(x: jax.Array, axis_name: AxisName, root: int = 0, *, unroll: bool = True) -> jax.Array:
    """The root gets the sum of every device's x (others zeros): ring reduce-scatter, then ring gather.

    x: any shape, flattened and padded to N blocks.
    Volume: 2(N-1) steps of |x|/N, 2(N-1)/N·|x| per device, against (N-1)/N·|x|·N
    for passing whole partial sums down a chain.
    """
    n = _size(axis_name)
    (block,) = _reduce_scatter_lanes([(_flat_blocks(x, n), 1)], axis_name, unroll)
    return _unflat(_gather_blocks(block, axis_name, root, unroll), x)


# --------------------------------------------------------------------------- global-array wrapper


def per_device_axes(mesh: jax.sharding.Mesh, axis_name: AxisName) -> tuple[str, ...]:
    """Mesh axes of size > 1 plus the collective's own axes, in mesh order."""
    wanted = {axis_name} if isinstance(axis_name, str) else set(axis_name)
    return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1 or a in wanted)


def on_mesh(
    collective: Callable[..., jax.Array],
    mesh: jax.sharding.Mesh,
    axis_name: AxisName,
    *,
    axes: Sequence[str] | None = None,
    **kwargs,
) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``f(x)`` that runs ``collective(local, axis_name, **kwargs)`` on every device's local array.

    x: a "per-device" global array [*sizes of ``axes``, *local shape], placed
    with one index of each of ``axes`` per device (``axes`` defaults to
    ``per_device_axes``), so each device holds its own [*local shape] array,
    and the axes not reduced over keep independent data. Returns the per-device
    results the same way. For tests and benchmarks:
    ``on_mesh(ring_all_reduce, mesh, "model")(x)`` equals
    ``on_mesh(lax.psum, mesh, "model")(x)``. ``collective`` may return a
    pytree of arrays (several collectives in one program).
    """
    axes = tuple(axes) if axes is not None else per_device_axes(mesh, axis_name)
    spec = PartitionSpec(*axes)
    lead = len(axes)

    def body(x):
        out = collective(x.reshape(x.shape[lead:]), axis_name, **kwargs)
        return jax.tree.map(lambda o: o.reshape((1,) * lead + o.shape), out)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)
    return jax.jit(mapped, in_shardings=NamedSharding(mesh, spec))


# Rooted lax references, for tests and for callers that want the built-in path.


def lax_broadcast(x, axis_name, root=0):
    return lax.psum(jnp.where(lax.axis_index(axis_name) == root, x, jnp.zeros_like(x)), axis_name)


def lax_scatter(x, axis_name, root=0, *, axis=0, tiled=True):
    masked = jnp.where(lax.axis_index(axis_name) == root, x, jnp.zeros_like(x))
    return lax.psum_scatter(masked, axis_name, scatter_dimension=axis, tiled=tiled)


def lax_gather(x, axis_name, root=0, *, axis=0, tiled=True):
    gathered = lax.all_gather(x, axis_name, axis=axis, tiled=tiled)
    return jnp.where(lax.axis_index(axis_name) == root, gathered, jnp.zeros_like(gathered))


def lax_reduce(x, axis_name, root=0):
    total = lax.psum(x, axis_name)
    return jnp.where(lax.axis_index(axis_name) == root, total, jnp.zeros_like(total))


LAX_EQUIVALENT: dict[Callable, Callable] = {
    ring_all_gather: lax.all_gather,
    ring_reduce_scatter: lax.psum_scatter,
    ring_all_reduce: lax.psum,
    bidirectional_all_reduce: lax.psum,
    ring_all_to_all: lax.all_to_all,
    ring_broadcast: lax_broadcast,
    ring_scatter: lax_scatter,
    ring_gather: lax_gather,
    ring_reduce: lax_reduce,
}


def optimal_bytes_per_device(collective: Callable, local_nbytes: int, n: int) -> float:
    """The bandwidth-optimal bytes each device sends, for a local input of ``local_nbytes``.

    (Before padding: the rings pad flattened arrays to a multiple of N.)
    """
    factor = {
        ring_all_gather: (n - 1),  # of the input: (N-1)/N of the N-times larger result
        ring_reduce_scatter: (n - 1) / n,
        ring_all_reduce: 2 * (n - 1) / n,
        bidirectional_all_reduce: 2 * (n - 1) / n,
        ring_all_to_all: (n - 1) / n,
        ring_broadcast: 2 * (n - 1) / n,
        ring_scatter: (n - 1) / n,
        ring_gather: (n - 1),
        ring_reduce: 2 * (n - 1) / n,
    }[collective]
    return factor * local_nbytes


__all__ = [
    "LAX_EQUIVALENT",
    "bidirectional_all_reduce",
    "on_mesh",
    "optimal_bytes_per_device",
    "per_device_axes",
    "ring_all_gather",
    "ring_all_reduce",
    "ring_all_to_all",
    "ring_broadcast",
    "ring_gather",
    "ring_reduce",
    "ring_reduce_scatter",
    "ring_scatter",
]
