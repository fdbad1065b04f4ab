"""An embedding lookup whose table stays sharded: token ids travel, not the table.

With the table's ``embed`` dimension sharded over a group of f devices that
also split the tokens (FSDP), gathering the [V, D] table for the lookup and
reduce-scattering its gradient moves 2(f-1)/f of V·D per device. With a real
vocabulary (32k-256k rows against a few thousand tokens a device) the rows
are far more than the tokens, and the cheaper way round is to move tokens:

forward, per device (T its tokens):
  1. all-gather the group's token ids: [f·T] ids, 4 bytes each;
  2. look up every group token's rows in the device's own column block
     [V, D/f] (with the vocabulary over ``model`` too, each device holds a
     [V/t, D/f] block: rows it does not hold are zeros);
  3. one all-to-all: token j's block of columns goes to the device that owns
     token j, which concatenates the f blocks into its [T, D] rows (with the
     vocabulary over ``model``, then summed over it, as the partitioner's
     vocabulary-parallel lookup sums them: T·D either way).
backward, the same all-to-all reversed (each device gets its column block of
the gradient of every group token), a scatter-add into the device's own
[V(/t), D/f] block (the sum over the group's tokens is complete there, so no
reduce-scatter), and one all-reduce of that block over the token axes that do
not shard the table (HSDP's ``data_replica``, ``seq``), unless ``deferred``.

Bytes per device: (f-1)/f of f·T ids, and 2 (f-1)/f of T·D rows, both ways:
independent of V. ``shardlib.parallel.reduction.lookup_gathers_table`` says
which way is cheaper; ``ReducedWeightUse`` takes this one when it is.
Why not leave it to the partitioner: for a table larger than the tokens it
replicates the table ("involuntary full rematerialization") and all-reduces
the whole table gradient, over the slow ``data_replica`` axis too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from shardlib.core.rules import axes_tuple
from shardlib.parallel.spec_parts import manual_part


def token_group(table_spec: P, token_axes: Sequence[str]) -> tuple[str, ...]:
    """The token axes a [V, D] table's ``embed`` dimension is split over (FSDP), in the spec's order."""
    embed = table_spec[1] if len(table_spec) > 1 else None
    return tuple(a for a in axes_tuple(embed) if a in token_axes)


def make_sharded_lookup(
    mesh: jax.sharding.Mesh,
    table_spec: P,
    ids_spec: P,
    token_axes: Sequence[str],
    *,
    deferred: bool = False,
    dtype: DTypeLike | None = None,
):
    """``lookup(ids, table_VxD) -> rows [*ids.shape, D]`` in the table's dtype, by moving token ids (module docstring).

    Args:
      mesh: the step's mesh (Auto axes).
      table_spec: the [V, D] table's PartitionSpec; its ``D`` dimension is split
        over some of ``token_axes`` (the group), its ``V`` dimension over none of them.
      ids_spec: the token ids' PartitionSpec (their dimensions over the token axes).
      token_axes: the mesh axes (size > 1) the tokens are split over.
      deferred: the table gradient leaves without its all-reduce over the token
        axes outside the group (``reduction.reduce_deferred`` does it once per step).
      dtype: what the gradient's all-reduce carries; None: the table's dtype.

    The rows come out sharded as the ids, whole along ``D``; the gradient is
    [V, D] sharded as ``table_spec``.
    """
    group = token_group(table_spec, token_axes)
    if not group:
        raise ValueError(f"table {table_spec} is not split over any token axis {tuple(token_axes)}: gather it instead")
    if any(a in token_axes for a in axes_tuple(table_spec[0])):
        raise ValueError(f"table {table_spec}: its vocabulary dimension is split over a token axis")
    vocab_axes = tuple(a for a in axes_tuple(table_spec[0]) if mesh.shape[a] > 1)
    own = tuple(a for entry in table_spec for a in axes_tuple(entry) if mesh.shape[a] > 1)
    manual = tuple(dict.fromkeys((*token_axes, *own)))
    ids_local = manual_part(ids_spec, manual)
    table_local = manual_part(table_spec, manual)
    rows_spec = P(*ids_local, None)
    # The gathered ids are the same on every device of the group: split only over the other token axes.
    others = tuple(a for entry in ids_local for a in axes_tuple(entry) if a not in group)
    group_ids_spec = P(others or None)
    rest = tuple(a for a in token_axes if a not in own)  # the gradient's all-reduce

    def block_first_row(block_rows: int):
        return jax.lax.axis_index(vocab_axes) * block_rows if vocab_axes else 0

    def forward_local(ids_l, table_l):
        ids_g = jax.lax.all_gather(ids_l.reshape(-1), group, tiled=True)  # [f T]: the group's tokens
        local = ids_g - block_first_row(table_l.shape[0])
        held = (local >= 0) & (local < table_l.shape[0])
        rows = jnp.take(table_l, jnp.where(held, local, 0), axis=0)  # [f T, D/f]
        rows = jnp.where(held[:, None], rows, jnp.zeros((), rows.dtype))
        rows = jax.lax.all_to_all(rows, group, 0, 1, tiled=True)  # [T, D]: my tokens, every column block
        if vocab_axes:  # each row comes from one vocabulary block: the sum is a copy
            rows = jax.lax.psum(rows, vocab_axes)
        return rows.reshape(*ids_l.shape, rows.shape[-1]), ids_g

    def backward_local(ids_g, table_l, dy_l):
        dy = jax.lax.all_to_all(dy_l.reshape(-1, dy_l.shape[-1]), group, 1, 0, tiled=True)  # [f T, D/f]
        local = ids_g - block_first_row(table_l.shape[0])
        held = (local >= 0) & (local < table_l.shape[0])
        dy = jnp.where(held[:, None], dy, jnp.zeros((), dy.dtype)).astype(table_l.dtype)
        grad = jnp.zeros_like(table_l).at[jnp.where(held, local, 0)].add(dy)
        if rest and not deferred:
            out_dtype = grad.dtype
            grad = jax.lax.psum(grad if dtype is None else grad.astype(dtype), rest).astype(out_dtype)
        return grad

    def shard(fn, in_specs, out_specs):
        return jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(manual), check_vma=False
        )

    forward_sharded = shard(forward_local, (ids_local, table_local), (rows_spec, group_ids_spec))
    backward_sharded = shard(backward_local, (group_ids_spec, table_local, rows_spec), table_local)

    @jax.custom_vjp
    def lookup(ids, table):
        return forward_sharded(ids, table)[0]

    def forward(ids, table):
        rows, ids_g = forward_sharded(ids, table)
        return rows, (ids_g, table)

    def backward(residuals, dy):
        ids_g, table = residuals
        return None, backward_sharded(ids_g, table, dy)

    lookup.defvjp(forward, backward)
    return jax.named_call(lookup, name="sharded_lookup")


def group_size(mesh: jax.sharding.Mesh, table_spec: P, token_axes: Sequence[str]) -> int:
    """f: the devices the table's columns are split over (``token_group``)."""
    return math.prod(mesh.shape[a] for a in token_group(table_spec, token_axes))
