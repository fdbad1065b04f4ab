"""Shardings for whatever follows the parameters: any optax state, any train state.

An optimizer's state holds trees that mirror the parameters (Adam's moments,
momentum traces, ``MultiSteps``' accumulated gradients) beside leaves that do
not: step counts, ``inject_hyperparams`` scalars, Adafactor's factored second
moments (a ``[m, n]`` kernel keeps a ``[m]`` row and an ``[n]`` column
statistic), and ``optax.MaskedNode`` placeholders (``masked``,
``multi_transform``) that hold no array at all. A train state adds a step,
RNG keys, and the parameters themselves.

``shardings_like_params`` gives every leaf of such a tree a sharding by two
rules, whatever container the tree uses (optax's NamedTuples, a flax
``TrainState``, an ``nnx.State`` of an ``nnx.Optimizer``, a plain dict):

1. *Which parameter*: the leaf whose path ends with the longest parameter
   path (``opt_state/1/0/mu/dense/kernel`` ends with ``dense/kernel``; the
   ``value`` attribute of Flax boxes and NNX variables is ignored). A leaf
   that ends with no parameter's path (a count, a hyperparameter, a key) is
   replicated.
2. *Which dimensions*: a leaf of the parameter's shape takes the parameter's
   sharding. Any other leaf takes, for each of its dimensions, the spec entry
   of the parameter dimension it lines up with: dimensions are matched in
   order to parameter dimensions of the same size (a factored ``[m]`` row
   lines up with the kernel's first dimension); a size-1 dimension is not
   split. A leaf that does not line up is replicated. The spec is built from
   the leaf's own shape, so it always has the leaf's rank and divides it.

A sharding is only a layout: a wrong guess costs memory or communication,
never a wrong number, and a replicated count costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.core.flax_axes import unbox_leaf
from shardlib.core.paths import is_flax_box, param_path
from shardlib.core.patterns import leaf_shape
from shardlib.core.rules import ShardingError

PyTree = Any


def _index_params(
    params: PyTree, param_shardings: PyTree
) -> dict[tuple[str, ...], tuple[tuple[int, ...], jax.sharding.Sharding]]:
    """Parameter path -> (shape, sharding); the two trees are matched by path, boxes or not."""
    shardings = {
        param_path(keypath): sharding
        for keypath, sharding in jax.tree_util.tree_flatten_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
        )[0]
    }
    index: dict[tuple[str, ...], tuple[tuple[int, ...], jax.sharding.Sharding]] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_flax_box)[0]:
        path = param_path(keypath)
        sharding = shardings.get(path)
        if not isinstance(sharding, jax.sharding.Sharding):
            found = "nothing" if sharding is None else repr(sharding)
            raise ShardingError(
                f"param_shardings has {found} for parameter {'/'.join(path)}; it must give a jax Sharding per "
                "parameter (tree_shardings(params, axes, rules, mesh))"
            )
        index[path] = (leaf_shape(unbox_leaf(leaf)), sharding)
    return index


def derived_spec(shape: Sequence[int], param_shape: Sequence[int], param_spec: PartitionSpec) -> PartitionSpec:
    """The spec of a leaf of ``shape`` that follows a parameter of ``param_shape`` sharded as ``param_spec``.

    Same shape: ``param_spec``. Otherwise each leaf dimension takes the spec
    entry of the next parameter dimension of the same size, in order (size 1:
    not split); if some dimension finds none, ``P()`` (replicated).
    ``[16, 32]`` as ``P("data", "model")`` gives ``[16]`` -> ``P("data")``,
    ``[32]`` -> ``P("model")``, ``[1]`` -> ``P(None)``, ``[]`` -> ``P()``.
    """
    entries = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if tuple(shape) == tuple(param_shape):
        return param_spec
    out: list[Any] = []  # PartitionSpec entries: None, an axis name or a tuple of them
    next_dim = 0
    for size in shape:
        if size == 1:
            out.append(None)
            continue
        while next_dim < len(param_shape) and param_shape[next_dim] != size:
            next_dim += 1
        if next_dim == len(param_shape):
            return PartitionSpec()
        out.append(entries[next_dim])
        next_dim += 1
    return PartitionSpec(*out)


def shardings_like_params(tree: PyTree, params: PyTree, param_shardings: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """A sharding for every leaf of ``tree``, following the parameter it belongs to (module docstring).

    Args:
      tree: any pytree of arrays or ShapeDtypeStructs: an optimizer state, a
        train state, an ``nnx.State``.
      params: the parameters (arrays or ShapeDtypeStructs), the tree
        ``param_shardings`` describes.
      param_shardings: a ``jax.sharding.Sharding`` per parameter
        (``tree_shardings``).
      mesh: where leaves that follow no parameter are replicated.
    Returns:
      ``tree``'s structure with a ``Sharding`` per array leaf: the
      parameter's, one derived from it (``NamedSharding(mesh, derived spec)``),
      or ``NamedSharding(mesh, P())``.
    """
    index = _index_params(params, param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def follow(keypath: tuple[Any, ...], leaf: Any) -> jax.sharding.Sharding:
        path = param_path(keypath)
        shape = leaf_shape(leaf)
        for start in range(len(path)):
            found = index.get(path[start:])
            if found is None:
                continue
            param_shape, sharding = found
            if shape == param_shape:
                return sharding
            if isinstance(sharding, NamedSharding):
                return NamedSharding(sharding.mesh, derived_spec(shape, param_shape, sharding.spec))
            return replicated
        return replicated

    return jax.tree_util.tree_map_with_path(follow, tree)


def optimizer_shardings(
    tx: optax.GradientTransformation,
    params: PyTree,
    param_shardings: PyTree,
    mesh: jax.sharding.Mesh,
) -> PyTree:
    """Shardings for ``tx.init(params)``, for any optax transformation (``shardings_like_params``).

    Args:
      tx: any ``optax.GradientTransformation`` (chains, ``multi_transform``,
        ``masked``, ``MultiSteps``, ``inject_hyperparams``, ``adafactor``...).
      params: plain pytree of arrays or ShapeDtypeStructs.
      param_shardings: a sharding per parameter, same structure.
      mesh: the mesh counts and hyperparameters are replicated on.
    Returns:
      The structure of ``tx.init(params)`` with a ``Sharding`` per leaf, for
      ``jax.jit(tx.init, out_shardings=...)`` or a step's in/out shardings.
    """
    return shardings_like_params(jax.eval_shape(tx.init, params), params, param_shardings, mesh)


def train_state_shardings(state: PyTree, params: PyTree, param_shardings: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """jit in/out shardings for a whole train state: parameters, optimizer state, step, RNG keys.

    Args:
      state: a flax ``TrainState``, the ``nnx.State`` of an ``nnx.Optimizer``
        (or of ``(model, optimizer)``), a plain dict ``{"params", "opt_state",
        "step", "rng"}``, or any pytree; arrays or ShapeDtypeStructs
        (``jax.eval_shape`` of the function that creates it).
      params: the parameters the state holds (``state.params``), plain.
      param_shardings: a sharding per parameter (``tree_shardings``).
      mesh: where the step, keys and other leaves following no parameter are
        replicated.
    Returns:
      ``state``'s structure with a ``Sharding`` per leaf:
      ``jax.jit(step, in_shardings=(shardings, ...), out_shardings=(shardings, ...))``.
    """
    return shardings_like_params(state, params, param_shardings, mesh)
