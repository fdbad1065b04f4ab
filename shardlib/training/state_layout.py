"""What a checkpoint must record about how its state is laid out, and how to move it onto another plan.

Two parts of the training state depend on the plan, not only on the model:

* the stacked layers' order: an interleaved pipeline stores them in its own
  order (``shardlib.parallel.pipeline.sends.layer_order``). The checkpoint records the
  order; restoring onto another pipeline, or none, permutes the layers, and
  every optimizer moment that mirrors them, into the new plan's order;
* compressed-gradient residuals (``shardlib.parallel.compression``): one row per
  device, the flattened local gradient shards of that device. They mean
  something only on the mesh and preset that made them. The checkpoint
  records that layout; restoring onto another one resets them to zero with a
  logged warning (the error feedback restarts; the parameters and moments are
  exact), never loads them into the wrong devices' rows;
* DiLoCo's replica count R: every replica's parameters and inner optimizer
  state have a leading [R] dimension (``shardlib.parallel.diloco``). The
  checkpoint records R; a run with another R refuses the step with one line
  (a replica's state has no counterpart in a run with other replicas). The
  layout inside the replicas may change like any other.

One part depends on neither, but on when the checkpoint was written: the
projection weights, five per layer before q/k/v and gate/up were fused, two
since (``shardlib.training.fused_projections``). A checkpoint records
``projections: fused``; an older one is restored in its own layout and
converted (``fuse_restored``), exactly; its compressed-gradient residuals,
flattened in the old leaf order, restart from zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from shardlib.parallel.pipeline.plan import relayout_index
from shardlib.training.checkpoint import CheckpointError
from shardlib.training.fused_projections import (
    FUSED,
    PROJECTIONS,
    fuse_separate,
    saved_projections,
    separate_targets,
)

PyTree = Any
LAYER_ORDER = "layer_order"
ERROR_FEEDBACK = "error_feedback_layout"
REPLICAS = "diloco_replicas"


def layout_meta(layer_order: np.ndarray, error_feedback: dict | None, replicas: int | None = None) -> dict:
    """The JSON the checkpoint stores: the layer order, the residuals' layout (or None), DiLoCo's R (or None),
    and that the projections are fused."""
    return {
        LAYER_ORDER: [int(i) for i in layer_order],
        ERROR_FEEDBACK: error_feedback,
        REPLICAS: replicas,
        PROJECTIONS: FUSED,
    }


def error_feedback_layout(compression) -> dict | None:
    """What the residuals' meaning depends on: the mesh's axis sizes, the batch axes, the padded size and,
    for streaming DiLoCo's fragments, the segments' sizes (a resume with another F restarts them)."""
    if compression is None:
        return None
    layout = {
        "mesh": {a: int(n) for a, n in compression.mesh.shape.items()},
        "batch_axes": list(compression.batch_axes),
        "flat_size": int(compression.flat_size),
        "mode": compression.mode,
    }
    if len(compression.segments) > 1:
        layout["segments"] = [int(s.size) for s in compression.segments]
    return layout


def relayout_layers(params: PyTree, opt_state: PyTree, tx: optax.GradientTransformation, index: np.ndarray):
    """Permutes the stacked layers (``params["layers"]`` and the optimizer leaves mirroring them) by ``index``.

    New stored position i takes old stored position ``index[i]``. Runs as one
    jitted gather per leaf, keeping every leaf's sharding.
    """
    take = jax.numpy.asarray(index)

    def permute_layers(tree):
        return {**tree, "layers": jax.tree.map(lambda w: w[take], tree["layers"])}

    def permute_state(state):
        return optax.tree_map_params(tx, lambda leaf, is_layer: leaf[take] if is_layer else leaf, state, flags)

    flags = {**jax.tree.map(lambda _: False, params), "layers": jax.tree.map(lambda _: True, params["layers"])}
    shardings = (jax.tree.map(lambda a: a.sharding, params), jax.tree.map(lambda a: a.sharding, opt_state))
    fn = jax.jit(lambda p, s: (permute_layers(p), permute_state(s)), out_shardings=shardings)
    return fn(params, opt_state)


def adapt_restored(
    params: PyTree,
    opt_state: PyTree,
    meta: dict,
    *,
    layer_order: np.ndarray,
    tx: optax.GradientTransformation,
    log: Callable[[str], None],
) -> tuple[PyTree, PyTree]:
    """Restored state in this plan's layer order; logs what moved.

    A checkpoint without a recorded order (older versions) is taken to be in
    the identity order, which is what every non-interleaved run stored.
    """
    saved = np.asarray(meta.get(LAYER_ORDER, np.arange(len(layer_order))))
    index = relayout_index(saved, np.asarray(layer_order))
    if index is None:
        return params, opt_state
    log("checkpoint layers were stored in another pipeline's order; moved into this plan's order")
    return relayout_layers(params, opt_state, tx, index)


def restore_targets(abstract_params: PyTree, abstract_opt_state: PyTree, meta: dict, compression) -> tuple:
    """(params, opt_state) to restore a step recorded with ``meta`` onto: this plan's targets, except
    residuals saved for another layout, which are read with their saved shapes (replicated) to be dropped.

    A step saved before the projections were fused is read in that layout (``fuse_restored`` converts it).
    Raises CheckpointError for a step saved with another DiLoCo replica count (or with none, or without).
    """
    _check_replicas(meta, abstract_params, abstract_opt_state)
    if saved_projections(meta) != FUSED:
        abstract_params, abstract_opt_state = separate_targets(abstract_params), separate_targets(abstract_opt_state)
    current = error_feedback_layout(compression)
    saved = meta.get(ERROR_FEEDBACK)
    if current is None or saved is None or saved == current:
        return abstract_params, abstract_opt_state
    devices = int(np.prod(list(saved["mesh"].values())))
    shards = int(np.prod([saved["mesh"][a] for a in saved["batch_axes"]]))
    replicated = jax.sharding.NamedSharding(compression.mesh, jax.sharding.PartitionSpec())
    shapes = {"worker": (devices, saved["flat_size"]), "server": (devices, saved["flat_size"] // shards)}
    error_feedback = {k: jax.ShapeDtypeStruct(s, np.float32, sharding=replicated) for k, s in shapes.items()}
    return abstract_params, {**abstract_opt_state, "error_feedback": error_feedback}


def _check_replicas(meta: dict, abstract_params: PyTree, abstract_opt_state: PyTree) -> None:
    """CheckpointError unless the step was saved with this run's DiLoCo replica count (None: no DiLoCo)."""
    saved = meta.get(REPLICAS)
    diloco = isinstance(abstract_opt_state, dict) and "anchor" in abstract_opt_state  # diloco_optimizer's state
    current = jax.tree.leaves(abstract_params)[0].shape[0] if diloco else None
    if saved == current:
        return

    def what(r):
        return "synchronous training's state" if r is None else f"the DiLoCo state of {r} replica groups"

    raise CheckpointError(
        f"checkpoint step {meta.get('step')} holds {what(saved)}, but this run has {what(current)} "
        "(outer.algorithm and outer.replica_axes on this mesh); resume with the run's own, or start another run_dir"
    )


def fuse_restored(params: PyTree, opt_state: PyTree, meta: dict, log: Callable[[str], None]) -> tuple:
    """(params, opt_state) with fused projections: converted if the checkpoint predates the fusion (logged)."""
    if saved_projections(meta) == FUSED:
        return params, opt_state
    log(
        "checkpoint from before the fused projections (layers/q, k, v, gate, up): "
        "converted to layers/qkv and layers/gate_up, parameters and optimizer moments exactly"
    )
    return fuse_separate(params), fuse_separate(opt_state)


def reset_foreign_residuals(opt_state: PyTree, meta: dict, compression, log: Callable[[str], None]) -> PyTree:
    """``opt_state`` with zero residuals if the checkpoint's were made on another layout (logged), else as is.

    Residuals saved before the projections were fused are flattened over the old
    parameter leaves, in another order: they restart from zero too.
    """
    current = error_feedback_layout(compression)
    saved = meta.get(ERROR_FEEDBACK)
    if current is None:
        return opt_state
    if saved == current and saved_projections(meta) != FUSED:
        log(
            "warning: the checkpoint's compressed-gradient residuals are flattened over the separate "
            "projections (layers/q, k, v, gate, up): the residuals restart from zero (parameters and moments are exact)"
        )
    elif saved == current:
        return opt_state
    else:
        log(
            f"warning: the checkpoint's compressed-gradient residuals belong to mesh {saved and saved['mesh']} "
            f"({saved and saved['flat_size']} values per device); this run's layout is mesh {current['mesh']} "
            f"({current['flat_size']}): the residuals restart from zero (parameters and moments are exact)"
        )
    zeros = jax.jit(compression.init_error_feedback, out_shardings=compression.error_feedback_shardings())()
    return {**opt_state, "error_feedback": zeros}
