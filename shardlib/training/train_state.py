"""Build a model and its optimizer state already sharded, without materialising anything whole.

The model is traced abstractly once (``abstract_model``) to learn its
structure, shapes and logical axes; the rules turn those into shardings; then
one jitted initialiser with those ``out_shardings`` creates every parameter
directly in its shards. Random initialisation is partitionable (threefry), so
the values do not depend on the mesh: a run on 8 devices starts from the same
parameters as a run on one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from shardlib.core.rules import Rules
from shardlib.core.sharding import (
    is_logical_axes,
    logical_axes_from_state,
    optimizer_shardings,
    tree_shardings,
)
from shardlib.models import create_model
from shardlib.parallel.diloco import replicate
from shardlib.training.config import ModelConfig, OptimizerConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AbstractModel:
    """A model's static structure.

    graphdef: merges with a params tree into a callable ``nnx.Module``.
    params: pure dict of ``jax.ShapeDtypeStruct`` (no sharding).
    logical_axes: same structure, leaves are tuples of logical names.
    """

    graphdef: nnx.GraphDef
    params: PyTree
    logical_axes: PyTree


def _build(cfg: ModelConfig, seed: int) -> nnx.Module:
    # Eager sharding would need a mesh context here; shardings are applied by
    # the caller's jit instead, from the rules.
    with nnx.use_eager_sharding(False):
        return create_model(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> AbstractModel:
    """Traces the model without allocating parameters.

    Plain ``jax.eval_shape`` rather than ``nnx.eval_shape``: the latter turns
    ``out_sharding`` metadata into shardings against whatever mesh the caller
    has set, and logical names are not mesh axes.
    """
    graphdefs = []

    def make():
        graphdef, state = nnx.split(_build(cfg, 0))
        graphdefs.append(graphdef)  # static structure, identical for every trace
        return state

    state = jax.eval_shape(make)
    return AbstractModel(graphdefs[0], nnx.to_pure_dict(state), logical_axes_from_state(state))


def decay_mask(logical_axes: PyTree) -> PyTree:
    """Weight decay applies to matrices only: not to norm scales (one dim besides ``layers``)."""
    return jax.tree.map(
        lambda axes: sum(a != "layers" for a in axes) >= 2,
        logical_axes,
        is_leaf=is_logical_axes,
    )


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int, logical_axes: PyTree) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and global-norm gradient clipping."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(logical_axes),
        ),
    )


@dataclasses.dataclass(frozen=True)
class StateShardings:
    """Where every leaf of the training state lives.

    replicas: DiLoCo's R when every parameter carries a leading replica
    dimension (``shardlib.parallel.diloco``), else None.
    """

    params: PyTree
    opt_state: PyTree
    replicas: int | None = None


def state_shardings(
    model: AbstractModel, tx: optax.GradientTransformation, rules: Rules, mesh: jax.sharding.Mesh
) -> StateShardings:
    """Shardings for parameters (from the rules) and optimizer state (following them)."""
    params = tree_shardings(model.params, model.logical_axes, rules, mesh)
    return StateShardings(params, optimizer_shardings(tx, model.params, params, mesh))


def init_state(
    cfg: ModelConfig,
    seed: int,
    tx: optax.GradientTransformation,
    shardings: StateShardings,
    layer_order: np.ndarray | None = None,
) -> tuple[PyTree, PyTree]:
    """Fresh (params, opt_state), each leaf created in its shards by one jitted initialiser.

    ``layer_order`` (stored position -> logical layer, from the parallel plan)
    stores the stacked layers in a pipeline's layout, so that every plan
    starts from the same network for the same seed. With ``shardings.replicas``
    every replica starts from that network.
    """

    def make():
        params = nnx.to_pure_dict(nnx.state(_build(cfg, seed)))
        if layer_order is not None and not np.array_equal(layer_order, np.arange(len(layer_order))):
            take = np.asarray(layer_order)
            params = {**params, "layers": jax.tree.map(lambda w: w[take], params["layers"])}
        if shardings.replicas is not None:
            params = replicate(params, shardings.replicas)
        return params, tx.init(params)

    return jax.jit(make, out_shardings=(shardings.params, shardings.opt_state))()


def abstract_state(model: AbstractModel, tx: optax.GradientTransformation, shardings: StateShardings):
    """(params, opt_state) as ShapeDtypeStructs carrying this mesh's shardings: a restore target."""

    def attach(leaf, sharding):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    params = model.params
    if shardings.replicas is not None:
        params = jax.eval_shape(lambda p: replicate(p, shardings.replicas), params)
    abstract_opt = jax.eval_shape(tx.init, params)
    return (
        jax.tree.map(attach, params, shardings.params),
        jax.tree.map(attach, abstract_opt, shardings.opt_state),
    )
