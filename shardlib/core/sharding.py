"""Apply a rule table to whole pytrees: parameters, optimizer state, activations.

Parameters are plain nested dicts of arrays (``nnx.to_pure_dict`` of a model's
``nnx.Param`` state, Linen params after ``unbox``, or any other project's
pytree). Their logical axes live in a second tree of the same structure whose
leaves are tuples of logical names, taken from Flax's metadata
(``flax_axes.logical_axes``: Linen boxes, NNX ``out_sharding``, patterns for
the rest) or assigned by path patterns alone (``match_logical_axes``).
Optimizer and train states follow the parameters (``state_sharding``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# Re-exported: this module is where these have always been imported from.
from shardlib.core.flax_axes import logical_axes_from_state
from shardlib.core.paths import is_logical_axes, path_str, reject_boxes
from shardlib.core.patterns import AxisPatterns, match_logical_axes
from shardlib.core.rules import LogicalAxes, Rules, ShardingError, logical_to_spec
from shardlib.core.state_sharding import optimizer_shardings

PyTree = Any
__all__ = [
    "ActivationSharding",
    "AxisPatterns",
    "is_logical_axes",
    "logical_axes_from_state",
    "match_logical_axes",
    "optimizer_shardings",
    "path_str",
    "shard_tree",
    "tree_shardings",
    "tree_specs",
]


def tree_specs(tree: PyTree, logical_tree: PyTree, rules: Rules, mesh: jax.sharding.Mesh) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``tree`` (plain arrays or ShapeDtypeStructs; ``unbox`` Flax trees first).

    ``logical_tree`` has ``tree``'s structure with a tuple of logical names
    per leaf; errors name the leaf's path.
    """
    reject_boxes(tree, "tree_specs")
    _check_same_paths(tree, logical_tree)

    def spec(keypath: tuple[Any, ...], leaf: Any, axes: LogicalAxes) -> PartitionSpec:
        return logical_to_spec(axes, rules, mesh, shape=leaf.shape, path=path_str(keypath))

    return jax.tree_util.tree_map_with_path(spec, tree, logical_tree)


def _check_same_paths(tree: PyTree, logical_tree: PyTree) -> None:
    """A clear error, naming a leaf, when the axes tree does not describe ``tree``."""
    leaves = {path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    axes = {path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=is_logical_axes)[0]}
    if leaves == axes:
        return
    only_tree = sorted(leaves - axes)
    only_axes = sorted(axes - leaves)
    detail = []
    if only_tree:
        detail.append(f"leaves without logical axes: {', '.join(only_tree[:5])}{' ...' if len(only_tree) > 5 else ''}")
    if only_axes:
        detail.append(f"axes for no leaf: {', '.join(only_axes[:5])}{' ...' if len(only_axes) > 5 else ''}")
    raise ShardingError(
        "the logical-axes tree does not have the parameter tree's structure ("
        + "; ".join(detail)
        + "). For a train or optimizer state (steps, counts, moments) use train_state_shardings / "
        "optimizer_shardings, which follow the parameters"
    )


def tree_shardings(tree: PyTree, logical_tree: PyTree, rules: Rules, mesh: jax.sharding.Mesh) -> PyTree:
    """A ``NamedSharding`` per leaf of ``tree``; errors name the leaf's path."""
    specs = tree_specs(tree, logical_tree, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_tree(tree: PyTree, logical_tree: PyTree, rules: Rules, mesh: jax.sharding.Mesh) -> PyTree:
    """Places an existing pytree of arrays on the mesh as the rules say."""
    return jax.device_put(tree, tree_shardings(tree, logical_tree, rules, mesh))


class ActivationSharding:
    """Constrains activations by logical names: the ``shard`` callable models take.

    Models call ``shard(x_BxLxD, ("batch", "length", "embed"))`` and never see
    a mesh axis. Inside ``jit`` this becomes ``with_sharding_constraint`` on a
    mesh with Auto axes and ``jax.sharding.reshard`` on one with Explicit axes
    (where a constraint only asserts). ``spec`` gives the ``PartitionSpec``
    for ``out_sharding=`` arguments of explicit-mode ops.
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
        spec = self.spec(x.shape, logical_axes)
        context = jax.sharding.get_abstract_mesh()
        if not context.empty and AxisType.Manual in tuple(context.axis_types):
            # Inside a shard_map (a pipeline stage): the constraint is on the context's mesh, whose manual
            # axes the rules leave out. One on the whole mesh would type x as sharded over automatic
            # axes the region does not have, and a cotangent meeting x in a transpose could not be cast to it.
            constrained: jax.Array = jax.lax.with_sharding_constraint(x, NamedSharding(context, spec))
            return constrained
        sharding = NamedSharding(self.mesh, spec)
        if AxisType.Explicit in tuple(self.mesh.axis_types):
            resharded: jax.Array = jax.sharding.reshard(x, sharding)
            return resharded
        constrained = jax.lax.with_sharding_constraint(x, sharding)
        return constrained
