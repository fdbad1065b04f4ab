"""Logical axes by path pattern, for parameters no annotation covers, with diagnostics.

A pattern table is an ordered list of ``(regex, logical axes)`` pairs; the
first pattern that matches a leaf's path (``encoder/layers_0/mlp/wi/kernel``)
gives its axes, and axes ``None`` replicate the leaf.

A pattern matches whole path segments: the match must start at the start of
the path or just after a ``/``, and end at the end of the path, just before a
``/``, or just after one. ``embed/embedding$`` therefore matches
``embed/embedding`` but not ``pos_embed/embedding``; ``kernel`` matches
``mlp/kernel`` but not ``mlp/kernel_scale``; ``^head/`` matches everything
under ``head``. Write ``.*bed`` for a match inside a segment.

What usually means a mistake is reported, naming the leaf and the pattern:

* a leaf no pattern matches is an error (``strict=True``, the default), so a
  renamed parameter is never replicated silently; ``strict=False`` replicates
  such leaves instead;
* a catch-all pattern (one matching the empty path, such as ``.*``) is an
  error under ``strict=True``: it would replicate, unnoticed, every parameter
  of a mistyped pattern. Ask for that with ``strict=False`` instead;
* a pattern that matches no leaf at all (mistyped) is an error under
  ``strict=True`` and a ``ShardingWarning`` otherwise;
* a pattern whose matches differ in rank, or in the size of a dimension it
  gives one logical name (a token and a position embedding, an up and a down
  projection), warns (``ShardingWarning``): one pattern, two roles.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from shardlib.core.paths import path_str, reject_boxes
from shardlib.core.rules import LogicalAxes, ShardingError, ShardingWarning

PyTree = Any
AxisPatterns = Sequence[tuple[str, LogicalAxes | None]]
_SHOWN = 8  # leaves listed in one message


@dataclasses.dataclass(frozen=True)
class _Pattern:
    source: str
    regex: re.Pattern[str]
    axes: LogicalAxes | None

    @property
    def is_catch_all(self) -> bool:
        return self.regex.search("") is not None


@dataclasses.dataclass(frozen=True)
class LeafToAssign:
    """One leaf for ``assign_logical_axes``: its path, shape, and axes from metadata if it has any."""

    path: str
    shape: tuple[int, ...]
    metadata_axes: LogicalAxes | None = None


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """The shape of an array, a ShapeDtypeStruct or a Python scalar."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def segment_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled so that ``search`` only matches whole path segments (module docstring)."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ShardingError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err
    return re.compile(rf"(?<![^/])(?:{pattern})(?:(?<=/)|(?![^/]))")


def _compile(patterns: AxisPatterns) -> list[_Pattern]:
    compiled = []
    for i, entry in enumerate(patterns):
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ShardingError(f"pattern {i} is {entry!r}; a pattern is a (regex, logical axes or None) pair")
        source, axes = entry
        if axes is not None:
            if not (isinstance(axes, tuple | list) and all(a is None or isinstance(a, str) for a in axes)):
                raise ShardingError(
                    f"pattern {source!r} gives {axes!r}; expected a tuple of logical names (or None entries), "
                    "or None to replicate"
                )
            axes = tuple(axes)
        compiled.append(_Pattern(source, segment_regex(source), axes))
    return compiled


def _listing(leaves: Sequence[LeafToAssign]) -> str:
    shown = ", ".join(f"{leaf.path} {leaf.shape}" for leaf in leaves[:_SHOWN])
    more = f" and {len(leaves) - _SHOWN} more" if len(leaves) > _SHOWN else ""
    return shown + more


def assign_logical_axes(
    leaves: Sequence[LeafToAssign], patterns: AxisPatterns, *, strict: bool = True, unmatched_note: str = ""
) -> list[LogicalAxes]:
    """Logical axes for each leaf: its metadata axes if it has them, else the first matching pattern.

    Args:
      leaves: the leaves, in any order; their paths name them in messages.
      patterns: the ordered ``(regex, logical axes | None)`` table.
      strict: see the module docstring.
      unmatched_note: appended to "matches no pattern" (e.g. "(no Flax metadata either)").
    Returns:
      One tuple of logical names per leaf, as long as its shape.
    Raises:
      ShardingError: as the module docstring says, naming the leaves and patterns.
    """
    table = _compile(patterns)
    if strict:
        for pattern in table:
            if pattern.is_catch_all:
                raise ShardingError(
                    f"pattern {pattern.source!r} is a catch-all (it matches every path): it would replicate, "
                    "unnoticed, the parameters of any mistyped pattern. Remove it and name every parameter, "
                    "or pass strict=False to replicate the leaves no pattern matches"
                )
    used: set[int] = set()
    matched_by: dict[int, list[LeafToAssign]] = {}
    unmatched: list[LeafToAssign] = []
    result: list[LogicalAxes] = []
    for leaf in leaves:
        first = None
        for i, pattern in enumerate(table):
            if pattern.regex.search(leaf.path):
                used.add(i)
                first = i if first is None else first
        axes = leaf.metadata_axes
        if axes is not None:
            if len(axes) != len(leaf.shape):
                raise ShardingError(
                    f"{leaf.path}: its Flax metadata names logical axes {tuple(axes)} but the leaf has "
                    f"shape {leaf.shape}"
                )
        elif first is not None:
            pattern = table[first]
            matched_by.setdefault(first, []).append(leaf)
            axes = (None,) * len(leaf.shape) if pattern.axes is None else pattern.axes
            if len(axes) != len(leaf.shape):
                raise ShardingError(
                    f"{leaf.path}: pattern {pattern.source!r} gives logical axes {axes} but the leaf has "
                    f"shape {leaf.shape}"
                )
        else:
            unmatched.append(leaf)
            axes = (None,) * len(leaf.shape)
        result.append(tuple(axes))

    tried = [p.source for p in table]
    note = f" {unmatched_note}" if unmatched_note else ""
    if unmatched and strict:
        if len(unmatched) == 1:
            what = f"{unmatched[0].path} (shape {unmatched[0].shape}) matches no pattern{note}"
            fix = "Add a pattern for it"
        else:
            what = f"{len(unmatched)} leaves match no pattern{note}: {_listing(unmatched)}"
            fix = "Add patterns for them"
        raise ShardingError(
            f"{what}; patterns tried: {tried}. {fix}, or pass strict=False to replicate every leaf no pattern matches"
        )
    unused = [p.source for i, p in enumerate(table) if i not in used]
    if unused:
        message = f"pattern(s) {unused} match no leaf (mistyped, or for another model?)"
        if strict:
            raise ShardingError(f"{message}; remove them, or pass strict=False to only warn")
        warnings.warn(message, ShardingWarning, stacklevel=3)
    for i, matched in matched_by.items():
        if not table[i].is_catch_all:
            _warn_if_two_roles(table[i], matched)
    return result


def _warn_if_two_roles(pattern: _Pattern, matched: Sequence[LeafToAssign]) -> None:
    """Warns when one pattern's leaves differ in rank, or in the size of one named dimension."""
    first = matched[0]
    for other in matched[1:]:
        if len(other.shape) != len(first.shape):
            warnings.warn(
                f"pattern {pattern.source!r} matches leaves of different ranks, {first.path} {first.shape} and "
                f"{other.path} {other.shape}: one pattern, two roles? Anchor it to the parameters meant",
                ShardingWarning,
                stacklevel=4,
            )
            return
        for dim, name in enumerate(pattern.axes or ()):
            if name is not None and other.shape[dim] != first.shape[dim]:
                warnings.warn(
                    f"pattern {pattern.source!r} gives logical axes {pattern.axes} to leaves whose dimension {dim} "
                    f"({name!r}) differs: {first.path} {first.shape} and {other.path} {other.shape}; one pattern, "
                    "two roles? Split it, or anchor it to the parameters meant",
                    ShardingWarning,
                    stacklevel=4,
                )
                return


def match_logical_axes(tree: PyTree, patterns: AxisPatterns, *, strict: bool = True) -> PyTree:
    """Assigns logical axes to an unannotated pytree by regex over leaf paths.

    Args:
      tree: any pytree of arrays or ShapeDtypeStructs (another project's
        model), unboxed: for Flax trees with annotations use
        ``shardlib.logical_axes``, which reads them and asks the patterns only
        for the rest.
      patterns: ordered ``(regex, logical axes)`` pairs matched against whole
        segments of the leaf's path (``a/b/kernel``); the first match wins.
        Axes ``None`` means replicated.
      strict: a leaf no pattern matches, a pattern matching nothing, and a
        catch-all are errors (module docstring); ``False`` replicates
        unmatched leaves.
    Returns:
      A tree of the same structure whose leaves are tuples of logical names,
      one per dimension of the leaf (see ``map_logical_axes``).
    Raises:
      ShardingError: naming the leaf or pattern at fault; also a Flax box in
        ``tree``, with how to unbox it.
    """
    reject_boxes(tree, "match_logical_axes")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [LeafToAssign(path_str(keypath), leaf_shape(leaf)) for keypath, leaf in flat]
    return jax.tree.unflatten(treedef, assign_logical_axes(leaves, patterns, strict=strict))
