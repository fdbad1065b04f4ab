"""DiLoCo's and local SGD's jitted steps, built from one ``ParallelPlan`` whose ``outer`` is set.

They replace the train step (``shardlib.training.step``) by two: the inner
step, every replica group's own optimizer step with no collective over the
replica axes, and the outer step, run after every H-th inner step (every
H/F-th when streaming), whose one all-reduce averages the pseudo-gradient
(``shardlib.parallel.diloco``, ``shardlib.parallel.diloco_streaming``); with
``outer.overlap_steps: 1`` the outer step runs inside the next inner step's
program instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.core.sharding import is_logical_axes
from shardlib.parallel.compression import GradCompression, make_grad_compression
from shardlib.parallel.diloco import OuterSettings, outer_update, replica_metrics, split_replicas
from shardlib.parallel.diloco_streaming import (
    Fragment,
    apply_fragment,
    fragment_pseudo_gradient,
    fragment_update,
    split_fragments,
)
from shardlib.training.parallel_plan import ParallelPlan
from shardlib.training.step import GradsFn, make_loss_fn
from shardlib.training.train_state import AbstractModel, StateShardings

PyTree = Any


def make_outer_compression(
    model: AbstractModel, plan: ParallelPlan, replica_param_shardings: PyTree, fragments: tuple[Fragment, ...] = ()
) -> GradCompression | None:
    """DiLoCo's compressed pseudo-gradient all-reduce over the replica axes, or None (``outer.compression: none``).

    The gradient compression's own reduction, its "shards" the replicas:
    ``GradCompression.reduce`` takes [R, *param] arrays sharded over the
    replica axes, as the pseudo-gradient is; only ``reduce`` and the
    error-feedback state are used (no loss runs through it). With ``fragments`` (streaming),
    each fragment is a segment of its own (``reduce_segment``) with its own residuals.
    """
    settings = plan.outer.settings
    axes = settings.replica_axes
    return make_grad_compression(
        settings.compression,
        make_loss=lambda _: None,
        params=model.params,
        param_shardings=replica_param_shardings,
        rules=plan.outer.plan.rules,
        mesh=plan.mesh,
        batch_spec=PartitionSpec(axes[0] if len(axes) == 1 else axes),
        grad_accum=1,
        segments=tuple(f.rows for f in fragments) if len(fragments) > 1 else None,
    )


@dataclasses.dataclass(frozen=True)
class DiLoCoSteps:
    """The jitted steps of a DiLoCo or local SGD run (``make_diloco_steps``).

    inner(params_R, opt_state, batch) -> (params_R, opt_state, metrics_R): every metric [R], per replica.
    outer[f](params_R, opt_state) -> (params_R, opt_state): the outer step of fragment f, after the inner
      steps ``OuterSettings.fragment_due`` names (one fragment, the whole network, unless streaming).
    overlapped[f](params_R, opt_state, batch) -> as inner: with ``outer.overlap_steps: 1``, the inner
      step that follows those, with fragment f's outer step in it: the all-reduce of the pseudo-gradient
      the step's input holds, independent of the inner step's compute (so XLA may run them at once),
      applied after it. () otherwise, and ``outer`` is then what the loop never runs.
    metrics([metrics_R, ...]) -> the steps' replicated scalars (``diloco.replica_metrics``), in one program.
    eval(anchor, batch) -> loss: the held-out loss of the outer parameters, ``opt_state["anchor"]``: the
      network the last outer step made (streaming: each fragment as of its own last outer step), never the
      replicas mid-period, a network DiLoCo never produces (``TrainingSetup.evaluated``).
    grads(params_R, batch) -> (loss_R, grads_R): every replica's own, for tests and tools.
    """

    inner: Callable
    outer: tuple[Callable, ...]
    overlapped: tuple[Callable, ...]
    metrics: Callable
    eval: Callable
    grads: Callable


def model_fragments(model: AbstractModel, count: int) -> tuple[Fragment, ...]:
    """Streaming DiLoCo's fragments of ``model``'s parameters: the layer stack cut in ``count``
    (``diloco.split_fragments``; stacked leaves are those whose first logical axis is ``layers``)."""
    shapes = [tuple(p.shape) for p in jax.tree.leaves(model.params)]
    axes = jax.tree.leaves(model.logical_axes, is_leaf=is_logical_axes)
    return split_fragments(shapes, [bool(a) and a[0] == "layers" for a in axes], count)


def _replica_grads(grads_fn: GradsFn, plan: ParallelPlan) -> Callable:
    """(params_R, batch [B, L]) -> every replica's (loss_R, grads_R, extra_R): ``grads_fn`` under vmap
    over the replica axes, each replica on its own rows [R, B/R, L]."""
    replica = plan.outer
    axes = replica.settings.replica_axes

    def replica_grads(params_R, batch):
        rows = {k: split_replicas(v, replica.batch_axes, axes, plan.mesh) for k, v in batch.items()}
        return jax.vmap(grads_fn, spmd_axis_name=_spmd(axes))(params_R, rows)

    return replica_grads


def _spmd(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return axes[0] if len(axes) == 1 else axes


def _inner_step(replica_grads: Callable, tx: optax.GradientTransformation, spmd) -> Callable:
    """(params_R, opt_state, batch) -> (params_R, opt_state, metrics_R): every replica's own step."""

    def inner(params_R, opt_state, batch):
        loss_R, grads_R, extra_R = replica_grads(params_R, batch)
        updates_R, opt_state = tx.update(grads_R, opt_state, params_R)
        params_R = optax.apply_updates(params_R, updates_R)
        norm_R = jax.vmap(optax.tree.norm, spmd_axis_name=spmd)
        metrics_R = {"loss": loss_R, "grad_norm": norm_R(grads_R), "param_norm": norm_R(params_R), **extra_R}
        return params_R, opt_state, metrics_R

    return inner


def _outer_steps(
    model: AbstractModel,
    settings: OuterSettings,
    outer_tx: optax.GradientTransformation,
    compression: GradCompression | None,
    inner: Callable,
) -> tuple[list[Callable], list[Callable]]:
    """(outer steps, overlapped steps), one per fragment (``DiLoCoSteps``): DiLoCo's own outer step for one
    fragment without mixing; else each fragment's (``diloco_streaming``); overlapped ones only with overlap."""

    def reduce_of(k: int):
        return None if compression is None else functools.partial(compression.reduce_segment, k)

    def whole_outer(params_R, opt_state):
        reduce = None if compression is None else compression.reduce
        return outer_update(params_R, opt_state, outer_tx, reduce, settings.moments)

    def fragment_outer(k: int, fragment: Fragment):
        def step(params_R, opt_state):
            return fragment_update(
                params_R, opt_state, outer_tx, fragment, reduce_of(k), settings.mixing, settings.moments
            )

        return step

    def overlapped_step(k: int, fragment: Fragment):
        def step(params_R, opt_state, batch):
            delta, opt_state = fragment_pseudo_gradient(params_R, opt_state, fragment, reduce_of(k))
            params_R, opt_state, metrics_R = inner(params_R, opt_state, batch)
            params_R, opt_state = apply_fragment(params_R, opt_state, outer_tx, fragment, delta, settings.mixing)
            return params_R, opt_state, metrics_R

        return step

    fragments = model_fragments(model, settings.fragments)
    whole = settings.fragments == 1 and not settings.mixing
    outers = [whole_outer] if whole else [fragment_outer(k, f) for k, f in enumerate(fragments)]
    overlapped = [overlapped_step(k, f) for k, f in enumerate(fragments)] if settings.overlap else []
    return outers, overlapped


def make_diloco_steps(
    model: AbstractModel,
    grads_fn: GradsFn,
    tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    shardings: StateShardings,
    plan: ParallelPlan,
    compression: GradCompression | None = None,
) -> DiLoCoSteps:
    """The inner, outer, metrics and eval steps of ``plan.outer``.

    ``grads_fn``: one replica's (``make_grads_fn`` of ``plan.outer.plan``),
    run under vmap over the replica axes on [R, B/R, L] rows; ``tx``:
    ``diloco.diloco_optimizer`` (the inner optimizer per replica);
    ``shardings``: params_R and the DiLoCo state's. Both steps donate the state.

    The inner step's metrics stay per replica ([R], sharded over the replica
    axes): a scalar mean in the step would be an all-reduce over the replica
    axes at every step; ``metrics`` reduces them when the host reads them
    (log steps and saves), in a separate program.
    """
    spmd, mesh = _spmd(plan.outer.settings.replica_axes), plan.mesh
    replica_grads = _replica_grads(grads_fn, plan)
    inner = _inner_step(replica_grads, tx, spmd)
    outers, overlapped = _outer_steps(model, plan.outer.settings, outer_tx, compression, inner)

    state = (shardings.params, shardings.opt_state)
    batch = {"inputs": plan.batch_sharding, "targets": plan.batch_sharding}
    replicated = NamedSharding(mesh, PartitionSpec())
    loss_fn = make_loss_fn(model.graphdef, plan)  # the whole mesh's rules: the mean is one network
    per_replica_metrics = NamedSharding(mesh, PartitionSpec(spmd))

    def stepping(fn):
        return jax.jit(
            fn, in_shardings=(*state, batch), out_shardings=(*state, per_replica_metrics), donate_argnums=(0, 1)
        )

    return DiLoCoSteps(
        inner=stepping(inner),
        outer=tuple(jax.jit(o, in_shardings=state, out_shardings=state, donate_argnums=(0, 1)) for o in outers),
        overlapped=tuple(stepping(o) for o in overlapped),
        # One program for all the steps the host fetches at once: one per step would queue up to
        # log_every more programs with an all-reduce each (XLA:CPU's stall: loop.steps_in_flight).
        metrics=jax.jit(lambda steps: [replica_metrics(m) for m in steps], out_shardings=replicated),
        eval=jax.jit(
            lambda anchor, b: loss_fn(anchor, b["inputs"], b["targets"]),
            in_shardings=(shardings.opt_state["anchor"], batch),
            out_shardings=replicated,
        ),
        grads=jax.jit(lambda params_R, b: replica_grads(params_R, b)[:2]),
    )
