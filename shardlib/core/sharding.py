"""Apply a rule table to whole pytrees: parameters, optimizer state, activations.

Parameters are plain nested dicts of arrays (``nnx.to_pure_dict`` of a model's
``nnx.Param`` state, or any other project's pytree). Their logical axes live in
a second tree of the same structure whose leaves are tuples of logical names,
taken from Flax's ``out_sharding`` metadata (``logical_axes_from_state``) or
assigned by path patterns (``match_logical_axes``) for models that carry no
annotations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.core.rules import LogicalAxes, Rules, ShardingError, logical_to_spec

PyTree = Any
AxisPatterns = Sequence[tuple[str, LogicalAxes | None]]


def is_logical_axes(x: Any) -> bool:
    """True for a leaf of a logical-axes tree: a tuple of names (or None); ``is_leaf`` for tree maps."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def path_str(keypath: Sequence[Any]) -> str:
    """A pytree key path as ``a/b/0``: the form patterns and messages use."""
    parts = []
    for key in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes_from_state(state: nnx.State) -> PyTree:
    """Logical axes of every variable of an NNX state, as a pure-dict tree.

    A variable without ``out_sharding`` metadata is an error: an unannotated
    parameter would otherwise be replicated silently.
    """

    def axes_of(path, variable):
        axes = variable.get_metadata().get("out_sharding")
        if axes is None:
            raise ShardingError(f"parameter {path_str(path)} has no logical axes (out_sharding metadata)")
        return tuple(axes)

    axes_state = nnx.map_state(axes_of, state)
    return nnx.to_pure_dict(axes_state)


def match_logical_axes(tree: PyTree, patterns: AxisPatterns) -> PyTree:
    """Assigns logical axes to an unannotated pytree by regex over leaf paths.

    Args:
      tree: any pytree of arrays or ShapeDtypeStructs (another project's model).
      patterns: ordered ``(regex, logical axes)`` pairs; ``re.search`` on the
        leaf's path (``a/b/kernel``); the first match wins. Axes ``None``
        means replicated. End with ``(".*", None)`` to make the table total.
    Returns:
      A tree of the same structure whose leaves are tuples of logical names.
    Raises:
      ShardingError: a leaf no pattern matches (strict, so that a renamed
        parameter is never replicated silently), or axes that do not match
        the leaf's rank.
    """
    compiled = [(re.compile(p), p, axes) for p, axes in patterns]

    def assign(keypath, leaf):
        path = path_str(keypath)
        for regex, source, axes in compiled:
            if regex.search(path):
                if axes is None:
                    return (None,) * len(leaf.shape)
                if len(axes) != len(leaf.shape):
                    raise ShardingError(
                        f"{path}: pattern {source!r} gives logical axes {tuple(axes)} but the "
                        f"leaf has shape {tuple(leaf.shape)}"
                    )
                return tuple(axes)
        raise ShardingError(
            f"{path} (shape {tuple(leaf.shape)}) matches no pattern; patterns tried: "
            f"{[p for _, p, _ in compiled]}. Add a pattern for it, or end the table with "
            f"('.*', None) to replicate everything unmatched"
        )

    return jax.tree_util.tree_map_with_path(assign, tree)


def tree_specs(tree: PyTree, logical_tree: PyTree, rules: Rules, mesh: jax.sharding.Mesh) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``tree`` (arrays or ShapeDtypeStructs)."""

    def spec(keypath, leaf, axes):
        return logical_to_spec(axes, rules, mesh, shape=leaf.shape, path=path_str(keypath))

    return jax.tree_util.tree_map_with_path(spec, tree, logical_tree)


def tree_shardings(tree: PyTree, logical_tree: PyTree, rules: Rules, mesh: jax.sharding.Mesh) -> PyTree:
    """A ``NamedSharding`` per leaf of ``tree``; errors name the leaf's path."""
    specs = tree_specs(tree, logical_tree, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_tree(tree: PyTree, logical_tree: PyTree, rules: Rules, mesh: jax.sharding.Mesh) -> PyTree:
    """Places an existing pytree of arrays on the mesh as the rules say."""
    return jax.device_put(tree, tree_shardings(tree, logical_tree, rules, mesh))


def optimizer_shardings(
    tx: optax.GradientTransformation,
    params: PyTree,
    param_shardings: PyTree,
    mesh: jax.sharding.Mesh,
) -> PyTree:
    """Shardings for ``tx.init(params)``: moments follow their parameter, scalars are replicated.

    ``params`` may be abstract (ShapeDtypeStructs). Works for any optax chain,
    because optax itself says which state leaves mirror the parameters.
    """
    abstract_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


class ActivationSharding:
    """Constrains activations by logical names: the ``shard`` callable models take.

    Models call ``shard(x_BxLxD, ("batch", "length", "embed"))`` and never see
    a mesh axis. Inside ``jit`` this becomes ``with_sharding_constraint``.
    """

    def __init__(self, rules: Rules, mesh: jax.sharding.Mesh):
        self.rules = rules
        self.mesh = mesh

    def spec(self, shape: Sequence[int], logical_axes: LogicalAxes) -> PartitionSpec:
        return logical_to_spec(
            logical_axes,
            self.rules,
            self.mesh,
            shape=shape,
            path=f"activation{tuple(logical_axes)}",
        )

    def __call__(self, x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
        sharding = NamedSharding(self.mesh, self.spec(x.shape, logical_axes))
        return jax.lax.with_sharding_constraint(x, sharding)
