"""Compressed data-parallel gradient all-reduce (bf16, or int8 with per-group scales) with error feedback.

Selected by ``grad_compression`` in the config (``none`` | ``bf16`` | ``int8``).
With ``none`` nothing here runs and XLA all-reduces the gradients as usual.

Algorithm, per device, over the batch mesh axes (N devices, one data shard each):

1. ``u = g + e``: this shard's gradient plus its worker residual ``e``.
2. ``c = Q(u)``, ``e <- u - deQ(c)`` (worker error feedback).
3. Reduce-scatter as an all-to-all (``collectives.ring_all_to_all``): device j
   receives block j of every ``c``, dequantizes and averages them in float32.
   Each block is quantized once on its way, unlike a ring reduce-scatter,
   which would requantize partial sums at every hop.
4. ``w = mean_j + s``, ``c2 = Q(w)``, ``s <- w - deQ(c2)`` (server error
   feedback; ``s`` covers this device's block only).
5. ``collectives.ring_all_gather`` of ``c2``; every device dequantizes the same
   bytes, so the result is bitwise identical on all of them (the owner of a
   block uses the dequantized value too, not its float32 original).

Bytes sent per device: 2(N-1)/N of the compressed gradient, i.e. 1/2 (bf16)
or 1/4 + 1/group (int8 with one float32 scale per ``group`` values) of an
uncompressed ring all-reduce. Error feedback makes the sum of the applied
gradients track the sum of the true ones: after T steps they differ by the
current residuals only (``sum_t out_t = T·mean(g) - mean_i(e_i) - s``),
not by T quantization errors.

How it sits in the jitted train step (``GradCompression.loss_and_grads``):
the model runs under ``jax.vmap`` over a leading per-shard dimension of the
batch ([S, B/S, L], S = product of the batch axes' sizes) with
``spmd_axis_name`` = the batch axes, so GSPMD keeps shard s's forward and
backward on the devices of shard s and returns per-shard gradients
[S, *param] sharded over the batch axes, with no gradient all-reduce. Inside,
activations are constrained by the same rules with the batch axes removed
(vmap adds them back on the shard dimension); tensor parallelism over
``model`` keeps working through the rules. Only the reduction is a
``shard_map`` (all axes manual, ``check_vma=False`` since its outputs are
replicated over the batch axes by construction, see 5.). Parameters must
not be sharded over the batch axes (``dp`` and ``tp`` presets; FSDP would
need a compressed reduce-scatter instead).

Segments (streaming DiLoCo's fragments, ``make_grad_compression(segments=...)``): the flat
vector is the concatenation of separately reduced segments, each some rows of some leaves'
leading dimension, padded to whole blocks, and ``reduce_segment`` reduces one of them, with
its own slices of both residuals; one segment of every leaf whole is the layout above.

Error-feedback state is per device: ``worker`` [devices, S_local] and
``server`` [devices, S_local/N] float32, device d holding row d (S_local: its
gradient shards flattened and padded). It lives in the optimizer state as
``{"tx": <optax state>, "error_feedback": {"worker", "server"}}`` and is
checkpointed with it; restoring onto a mesh with another layout is not
supported (the residuals belong to the devices that made them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.core.rules import Rules, spec_axes, without_axes
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.accumulation import loss_and_grads
from shardlib.parallel.collectives import AxisName, ring_all_gather, ring_all_to_all

PyTree = Any
MODES = ("float32", "bfloat16", "int8")
CONFIG_MODES = {"bf16": "bfloat16", "int8": "int8"}  # config value -> mode
# Not a config choice: the same explicit path without compression, for tests and benchmarks.
_UNCOMPRESSED = {"fp32": "float32"}
INT8_GROUP = 256  # values per int8 scale: 1.6% overhead, and an outlier spoils only its own group


# --------------------------------------------------------------------------- quantizers


def quantize(u: jax.Array, mode: str, group: int = INT8_GROUP) -> tuple[jax.Array, ...]:
    """Float32 [..., K] -> payload: (bf16 [..., K],), (int8 [..., K], f32 scales [..., K/group]) or (u,).

    int8: symmetric, round to nearest, scale = max|u| / 127 per group of
    ``group`` consecutive values (an all-zero group gets scale 1).
    """
    if mode == "float32":
        return (u,)
    if mode == "bfloat16":
        return (u.astype(jnp.bfloat16),)
    if mode != "int8":
        raise ValueError(f"unknown compression mode {mode!r}; known: {', '.join(MODES)}")
    if u.shape[-1] % group:
        raise ValueError(f"int8 compression needs the last dimension ({u.shape[-1]}) to divide by group={group}")
    grouped = u.reshape(u.shape[:-1] + (u.shape[-1] // group, group))
    absmax = jnp.max(jnp.abs(grouped), axis=-1)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(grouped / scale[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(u.shape), scale


def dequantize(payload: tuple[jax.Array, ...], mode: str, group: int = INT8_GROUP) -> jax.Array:
    """Inverse of ``quantize`` (up to its rounding), in float32."""
    if mode in ("float32", "bfloat16"):
        return payload[0].astype(jnp.float32)
    q, scale = payload
    grouped = q.reshape(q.shape[:-1] + (q.shape[-1] // group, group)).astype(jnp.float32)
    return (grouped * scale[..., None]).reshape(q.shape)


def payload_bytes(size: int, mode: str, group: int = INT8_GROUP) -> int:
    """Bytes of the compressed form of ``size`` float32 values."""
    if mode == "float32":
        return 4 * size
    if mode == "bfloat16":
        return 2 * size
    return size + 4 * (size // group)


# --------------------------------------------------------------------------- the collective (inside shard_map)


def padded_size(size: int, n: int, mode: str, group: int = INT8_GROUP) -> int:
    """``size`` rounded up so that it splits into n blocks (of whole int8 groups)."""
    unit = n * (group if mode == "int8" else 1)
    return -(-size // unit) * unit


def compressed_mean(
    u_flat: jax.Array,
    worker: jax.Array,
    server: jax.Array,
    axis_name: AxisName | None,
    mode: str,
    *,
    group: int = INT8_GROUP,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean over ``axis_name`` of every device's float32 vector, sent compressed, with error feedback.

    Call inside ``shard_map``. u_flat, worker: [S] float32 per device, S a
    multiple of N (of N·group for int8, see ``padded_size``); server: [S/N].
    ``axis_name=None`` means one device (N = 1: nothing is sent, but the
    values still go through both quantizations).
    Returns (mean [S], identical on every device; new worker; new server).
    Sends 2(N-1) messages of S/N compressed values per device: N-1 in the
    all-to-all, N-1 in the all-gather.
    """
    n = 1 if axis_name is None else lax.axis_size(axis_name)
    size = u_flat.shape[0]
    if size % (n * (group if mode == "int8" else 1)):
        raise ValueError(f"vector of {size} values does not split into {n} blocks of whole groups; pad it")
    u = u_flat + worker
    sent = quantize(u.reshape(n, size // n), mode, group)  # block j is for device j
    worker = u - dequantize(sent, mode, group).reshape(size)
    if axis_name is not None and n > 1:  # n > 1 only with an axis
        sent = tuple(ring_all_to_all(p, axis_name, 0, 0) for p in sent)  # row j: my block, from device j
    mean = jnp.sum(dequantize(sent, mode, group), axis=0) / n
    w = mean + server
    reduced = quantize(w, mode, group)
    server = w - dequantize(reduced, mode, group)
    if axis_name is not None and n > 1:
        reduced = tuple(ring_all_gather(p, axis_name) for p in reduced)  # [N, S/N]: block j from device j
    else:
        reduced = tuple(p[None] for p in reduced)
    return dequantize(reduced, mode, group).reshape(size), worker, server


def _pad_to(x: jax.Array, unit: int) -> jax.Array:
    """A 1-D array zero-padded to a multiple of ``unit``."""
    return jnp.pad(x, (0, -x.size % unit))


# --------------------------------------------------------------------------- training integration


Rows = tuple[int, int] | None  # a leaf's leading rows [start, stop) in a segment, or None: not in it


@dataclasses.dataclass(frozen=True)
class Segment:
    """One separately reduced part of the flat vector (module docstring, "Segments").

    rows[i]: leaf i's rows in it, or None; pieces: the indices of the leaves in it, and
    piece_shapes their per-device shapes; [offset, offset + size) of the worker residual (and
    [offset / N, (offset + size) / N) of the server's) are its own.
    """

    rows: tuple[Rows, ...]
    pieces: tuple[int, ...]
    piece_shapes: tuple[tuple[int, ...], ...]
    offset: int
    size: int


def _segments(
    rows_per_segment: tuple[tuple[Rows, ...], ...], shapes, local_shapes, specs, n: int, mode: str, group: int
) -> tuple[Segment, ...]:
    """The segments' pieces and places in the flat vector; a leaf cut into rows must not be sharded on them."""
    unit = group if mode == "int8" else 1
    out, offset = [], 0
    for rows in rows_per_segment:
        pieces, piece_shapes = [], []
        for i, r in enumerate(rows):
            if r is None:
                continue
            whole = not shapes[i] or r == (0, shapes[i][0])
            if not whole and len(specs[i]) and specs[i][0] is not None:
                raise ValueError(f"leaf {i} is cut into rows {r} but sharded on them ({specs[i]})")
            pieces.append(i)
            piece_shapes.append(local_shapes[i] if whole else (r[1] - r[0], *local_shapes[i][1:]))
        size = padded_size(sum(-(-math.prod(s) // unit) * unit for s in piece_shapes), n, mode, group)
        out.append(Segment(tuple(rows), tuple(pieces), tuple(piece_shapes), offset, size))
        offset += size
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class GradCompression:
    """Everything static about compressed gradient reduction on one mesh; see the module docstring.

    loss_and_grads(params, opt_state, batch) -> (loss, mean grads, opt_state with new residuals)
    """

    mode: str
    mesh: jax.sharding.Mesh
    batch_axes: tuple[str, ...]  # mesh axes (size > 1) the batch is split over
    param_shardings: PyTree
    local_shapes: tuple[tuple[int, ...], ...]  # per parameter leaf, in tree order
    flat_size: int  # per device, padded: the segments' sizes summed
    loss_fn: Callable  # loss(params, inputs, targets) with per-shard activation sharding
    shard: ActivationSharding  # the same, for microbatching
    grad_accum: int
    segments: tuple[Segment, ...]  # one, every leaf whole, unless made with segments
    group: int = INT8_GROUP

    @property
    def leaf_unit(self) -> int:
        """Each leaf's values are padded to a multiple of this in the flat vector: whole int8 groups."""
        return self.group if self.mode == "int8" else 1

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    @property
    def axis_name(self) -> AxisName | None:
        if not self.batch_axes:
            return None
        return self.batch_axes[0] if len(self.batch_axes) == 1 else self.batch_axes

    # --- error-feedback state

    def _per_device(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names)))

    def error_feedback_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        devices = self.mesh.size
        return {
            "worker": jax.ShapeDtypeStruct((devices, self.flat_size), jnp.float32, sharding=self._per_device()),
            "server": jax.ShapeDtypeStruct(
                (devices, self.flat_size // self.shards), jnp.float32, sharding=self._per_device()
            ),
        }

    def init_error_feedback(self) -> dict[str, jax.Array]:
        """Zero residuals (call under jit with ``error_feedback_shardings`` to create them in place)."""
        return {k: jnp.zeros(s.shape, s.dtype) for k, s in self.error_feedback_shapes().items()}

    def error_feedback_shardings(self) -> dict[str, NamedSharding]:
        return {k: s.sharding for k, s in self.error_feedback_shapes().items()}

    def wrap(self, tx: optax.GradientTransformation, shardings):
        """(tx, StateShardings) -> versions whose optimizer state also holds the residuals.

        The returned tx's ``init`` adds zero residuals; its ``update`` applies
        ``tx`` to already reduced gradients and passes the residuals through
        (``loss_and_grads`` is what updates them).
        """

        def init(params):
            return {"tx": tx.init(params), "error_feedback": self.init_error_feedback()}

        def update(updates, state, params=None):
            updates, inner = tx.update(updates, state["tx"], params)
            return updates, {"tx": inner, "error_feedback": state["error_feedback"]}

        opt = {"tx": shardings.opt_state, "error_feedback": self.error_feedback_shardings()}
        return optax.GradientTransformation(init, update), dataclasses.replace(shardings, opt_state=opt)

    # --- the step

    def per_shard_loss_and_grads(self, params: PyTree, batch: dict[str, jax.Array]):
        """(losses [S], grads with a leading [S] dim sharded over the batch axes); no cross-shard traffic."""
        s = self.shards

        def split(x_BxL):
            x = x_BxL.reshape((s, x_BxL.shape[0] // s) + x_BxL.shape[1:])  # shard k = rows of device k
            return lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(self.batch_axes or None)))

        def one_shard(inputs, targets):
            micro = {"inputs": inputs, "targets": targets}
            return loss_and_grads(self.loss_fn, params, micro, self.grad_accum, self.shard)

        spmd = self.batch_axes or None
        return jax.vmap(one_shard, spmd_axis_name=spmd)(split(batch["inputs"]), split(batch["targets"]))

    def reduce(self, grads_S: PyTree, error_feedback: dict[str, jax.Array]):
        """Per-shard gradients [S, *param] -> (mean gradients, new residuals), compressed on the wire."""
        if len(self.segments) != 1:
            raise ValueError("a compression made of segments reduces one at a time: reduce_segment")
        leaves, treedef = jax.tree.flatten(grads_S)
        reduced, error_feedback = self.reduce_segment(0, leaves, error_feedback)
        return jax.tree.unflatten(treedef, reduced), error_feedback

    def reduce_segment(self, index: int, pieces_S: list[jax.Array], error_feedback: dict[str, jax.Array]):
        """Segment ``index``'s pieces -> (their means, residuals with this segment's slices updated).

        pieces_S[k]: [S, *piece] for leaf ``segments[index].pieces[k]``, its rows in the segment
        (sharded as the leaf is, over the batch axes on S); returns [*piece] each, replicated over
        the batch axes. Only this segment's values cross the wire.
        """
        segment = self.segments[index]
        shardings = jax.tree.leaves(self.param_shardings)
        specs = [shardings[i].spec for i in segment.pieces]
        all_axes = tuple(self.mesh.axis_names)
        per_device = PartitionSpec(all_axes)
        lead = self.batch_axes or None
        unit = self.leaf_unit
        lo, hi = segment.offset, segment.offset + segment.size
        n = self.shards

        def body(worker, server, *local):
            # Every leaf starts a new int8 group: a group mixing a replicated leaf with a tensor-parallel
            # one would give the replicated leaf another scale on each tensor peer, and its replicas
            # would drift apart.
            flat = jnp.concatenate([_pad_to(g.reshape(-1).astype(jnp.float32), unit) for g in local])
            flat = jnp.pad(flat, (0, segment.size - flat.size))
            own_worker, own_server = worker[0, lo:hi], server[0, lo // n : hi // n]
            mean, new_worker, new_server = compressed_mean(
                flat, own_worker, own_server, self.axis_name, self.mode, group=self.group
            )
            # int8 would round a NaN to a number, hiding it from faults.nan_policy and keeping it
            # in the residual for good. Every device learns whether any gradient was not finite
            # (one 4-byte all-reduce), then all return NaN and keep their residuals.
            bad = lax.psum(jnp.logical_not(jnp.all(jnp.isfinite(flat))).astype(jnp.int32), all_axes) > 0
            mean = jnp.where(bad, jnp.nan, mean)
            worker = worker.at[0, lo:hi].set(jnp.where(bad, own_worker, new_worker))
            server = server.at[0, lo // n : hi // n].set(jnp.where(bad, own_server, new_server))
            out, offset = [], 0
            for g, shape in zip(local, segment.piece_shapes, strict=True):
                size = math.prod(shape)
                out.append(mean[offset : offset + size].reshape(shape).astype(g.dtype))
                offset += -(-size // unit) * unit
            return worker, server, *out

        mapped = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(per_device, per_device, *(PartitionSpec(lead, *spec) for spec in specs)),
            out_specs=(per_device, per_device, *specs),
            check_vma=False,  # outputs are identical across the batch axes by construction
        )
        worker, server, *reduced = mapped(error_feedback["worker"], error_feedback["server"], *pieces_S)
        return reduced, {"worker": worker, "server": server}

    def loss_and_grads(self, params: PyTree, opt_state: dict, batch: dict[str, jax.Array]):
        """The train step's (loss, mean gradients), and opt_state with updated residuals.

        A step whose per-shard gradients are not all finite returns NaN
        gradients and leaves the residuals as they were (see ``reduce``), so
        ``faults.nan_policy`` sees it and ``skip`` drops it cleanly.
        """
        losses, grads_S = self.per_shard_loss_and_grads(params, batch)
        grads, error_feedback = self.reduce(grads_S, opt_state["error_feedback"])
        return jnp.mean(losses), grads, {**opt_state, "error_feedback": error_feedback}


def make_grad_compression(
    setting: str,
    *,
    make_loss: Callable[[ActivationSharding], Callable],
    params: PyTree,
    param_shardings: PyTree,
    rules: Rules,
    mesh: jax.sharding.Mesh,
    batch_spec: PartitionSpec,
    grad_accum: int,
    group: int = INT8_GROUP,
    segments: tuple[tuple[Rows, ...], ...] | None = None,
) -> GradCompression | None:
    """The compression a config's ``grad_compression`` asks for, or None for ``none``.

    make_loss(shard) -> loss(params, inputs_BxL, targets_BxL): the run's loss
    (its attention included) constraining activations with ``shard``, the
    rules without the batch axes (vmap adds them back on the shard dimension).
    params: abstract parameters (shapes); batch_spec: the [batch, length]
    token arrays' spec, whose first entry names the batch axes; segments: per segment, each leaf's
    leading rows in it or None (module docstring, "Segments"); None: one segment, every leaf whole.
    Which features it combines with is the compatibility table's business
    (``shardlib.parallel.compat``); a parameter sharded over a batch axis is refused here
    too, since compressed reduce-scatter (FSDP) is not implemented.
    """
    if setting == "none":
        return None
    modes = CONFIG_MODES | _UNCOMPRESSED
    if setting not in modes:
        raise ValueError(f"unknown grad_compression {setting!r}; known: none, {', '.join(CONFIG_MODES)}")
    first = batch_spec[0] if len(batch_spec) else None
    batch_axes = tuple(a for a in ((first,) if isinstance(first, str) else (first or ())) if mesh.shape[a] > 1)
    for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        if clash := set(spec_axes(sharding.spec)) & set(batch_axes):
            raise ValueError(
                f"grad_compression={setting} needs parameters replicated over the batch axes, but "
                f"{jax.tree_util.keystr(path)} is sharded over {sorted(clash)} ({sharding.spec}); use the dp or tp "
                "preset (compressed reduce-scatter for FSDP is not implemented)"
            )
    mode = modes[setting]
    n = math.prod(mesh.shape[a] for a in batch_axes)
    local_shapes = tuple(
        tuple(s.shard_shape(p.shape)) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings))
    )
    shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
    whole = (tuple((0, s[0]) if s else (0, 1) for s in shapes),)
    specs = [s.spec for s in jax.tree.leaves(param_shardings)]
    parts = _segments(segments or whole, shapes, local_shapes, specs, n, mode, group)
    inner = ActivationSharding(without_axes(rules, batch_axes), mesh)
    return GradCompression(
        mode=mode,
        mesh=mesh,
        batch_axes=batch_axes,
        param_shardings=param_shardings,
        local_shapes=local_shapes,
        flat_size=sum(p.size for p in parts),
        loss_fn=make_loss(inner),
        shard=inner,
        grad_accum=grad_accum,
        segments=parts,
        group=group,
    )
