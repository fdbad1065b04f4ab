"""Leaf paths and logical-axes trees: the vocabulary every tree function here shares.

A *logical-axes tree* has the structure of a parameter tree, and each of its
leaves is a tuple of logical names (or None), one per dimension: ``("embed",
"mlp")``. JAX sees those tuples as containers, so a plain ``jax.tree.map`` over
such a tree walks into them and drops their ``None`` entries (None is an empty
pytree); ``map_logical_axes`` (or ``is_leaf=is_logical_axes``) keeps them
whole.

Flax wraps leaves in boxes (Linen's ``nn.LogicallyPartitioned``, NNX's
``nnx.Variable``), and JAX's key paths then end in ``/value``. The functions
that take plain trees refuse boxed ones with a hint (``reject_boxes``) rather
than fail later on a structure mismatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import meta

from shardlib.core.rules import ShardingError

PyTree = Any


def is_logical_axes(x: Any) -> bool:
    """True for a leaf of a logical-axes tree: a tuple of names (or None); ``is_leaf`` for tree maps."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def map_logical_axes(fn: Callable[..., Any], axes_tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map(fn, axes_tree, *rest)`` with each tuple of logical names as one leaf.

    ``fn`` gets the whole tuple, e.g. ``("embed", None)``, then the matching
    leaves (or subtrees) of ``rest``: ``map_logical_axes(lambda axes, p: ...,
    axes, params)``.
    """
    return jax.tree.map(fn, axes_tree, *rest, is_leaf=is_logical_axes)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """A pytree key path as ``a/b/0``: the form patterns and messages use."""
    return "/".join(_key_name(key) for key in keypath)


def param_path(keypath: Sequence[Any]) -> tuple[str, ...]:
    """A key path as a tuple of names, without the ``value`` attribute of a Flax box or variable.

    ``params/up/kernel/value`` (a Linen box, or an NNX variable seen by JAX)
    and ``params/up/kernel`` (its unboxed value) name the same parameter. Only
    attribute keys are dropped, so a dict entry called ``value`` stays.
    """
    keypath = tuple(keypath)
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return tuple(_key_name(key) for key in keypath)


def is_flax_box(x: Any) -> bool:
    """True for a Linen metadata box (``nn.LogicallyPartitioned``, ``nn.Partitioned``) or an NNX variable."""
    return isinstance(x, meta.AxisMetadata | nnx.Variable)


def reject_boxes(tree: PyTree, caller: str) -> None:
    """Raises a ``ShardingError`` naming the first Flax box in ``tree``, with how to unbox it.

    ``caller`` is the function the tree was given to, for the message.
    """
    if isinstance(tree, nnx.Module):
        raise ShardingError(
            f"{caller} got an nnx.Module; pass its parameters as a plain tree: nnx.to_pure_dict(nnx.state(model, "
            "nnx.Param)), or use shardlib.logical_axes(nnx.state(model, nnx.Param), patterns) to read its metadata"
        )
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_flax_box)[0]:
        if not is_flax_box(leaf):
            continue
        path = path_str(keypath) or "<root>"
        kind = type(leaf).__name__
        if isinstance(leaf, nnx.Variable):
            how = "nnx.to_pure_dict(state)"
        else:
            how = "flax.linen.meta.unbox(params) (shardlib.unbox)"
        raise ShardingError(
            f"{caller}: leaf {path} is a Flax {kind} box (JAX would show its path as {path}/value); "
            f"pass the plain tree, {how}, and take its logical axes from shardlib.logical_axes(boxed, patterns), "
            "which reads the box's names"
        )
