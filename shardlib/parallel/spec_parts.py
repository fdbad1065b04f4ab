"""A PartitionSpec cut to some of its mesh axes: what a partly manual ``shard_map`` may be told.

Inside ``jax.shard_map(..., axis_names=manual)`` an array's spec may name
only the manual axes; the automatic ones stay with the partitioner. The
strategies that reduce gradients or move tokens by hand (``reduction``,
``sharded_lookup``) split a parameter's or an activation's spec this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jax.sharding import PartitionSpec as P

from shardlib.core.rules import axes_tuple


def _kept(spec: P, keep: Callable[[str], bool]) -> P:
    """``spec`` with only the mesh axes ``keep`` accepts (a dimension left with none is whole)."""
    entries = []
    for entry in spec:
        kept = tuple(a for a in axes_tuple(entry) if keep(a))
        entries.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*entries)


def manual_part(spec: P, axes: Sequence[str]) -> P:
    """``spec`` with only ``axes`` kept: what a ``shard_map`` manual over ``axes`` may be told."""
    return _kept(spec, lambda a: a in axes)


def automatic_part(spec: P, axes: Sequence[str]) -> P:
    """``spec`` without ``axes``: the parameter gathered over the token axes, still split over the others."""
    return _kept(spec, lambda a: a not in axes)
