"""Everything static about a run on a mesh: its plan, shardings and jitted steps.

``setup_training(cfg, mesh)`` builds the ``ParallelPlan`` once and derives the
rest from it: the abstract model, the optimizer, where every state leaf lives,
and the train, eval and gradient steps (compiled on first call). The training
loop (``shardlib.training.trainer``), the report and the tests all start here.

With ``outer`` (DiLoCo, local SGD) the train step is the inner step, the
parameters carry a leading replica dimension, the optimizer state holds the
outer loop's too (``shardlib.parallel.diloco.diloco_optimizer``), and
``outer_step`` runs after every H-th step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding

from shardlib.core.sharding import optimizer_shardings
from shardlib.parallel.compression import GradCompression
from shardlib.parallel.diloco import check_moments, diloco_optimizer, outer_optimizer, per_replica, replicate
from shardlib.training.config import Config
from shardlib.training.data import BatchLoader
from shardlib.training.diloco_steps import make_diloco_steps, make_outer_compression, model_fragments
from shardlib.training.faults import optimizer_for_policy
from shardlib.training.parallel_plan import ParallelPlan, build_plan
from shardlib.training.state_layout import error_feedback_layout, layout_meta
from shardlib.training.step import make_compression, make_eval_step, make_grads_fn, make_train_step
from shardlib.training.train_state import (
    AbstractModel,
    StateShardings,
    abstract_model,
    init_state,
    make_optimizer,
    state_shardings,
)


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Everything static about a run on a mesh: the plan, shardings and the jitted steps.

    train_step(params, opt_state, batch) -> (params, opt_state, metrics)
    eval_step(network, batch) -> loss: of ``evaluated(params, opt_state)``
    grads(params, batch) -> (loss, grads): the step's gradients, for tests and tools
    compression: the compressed reduction whose residuals live in ``opt_state["error_feedback"]``:
      the gradients' (``grad_compression``), or DiLoCo's pseudo-gradient's (``outer.compression``).
    outer_steps[f](params, opt_state) -> (params, opt_state): DiLoCo's outer step of fragment f (one
      fragment, the whole network, unless streaming), due after the steps ``outer_due`` names,
      ``outer_step_after`` picks the one; () without ``outer``. Its train step's metrics are per
      replica until ``scalar_metrics`` reduces them.
    """

    cfg: Config
    mesh: jax.sharding.Mesh
    plan: ParallelPlan
    model: AbstractModel
    tx: optax.GradientTransformation
    shardings: StateShardings
    train_step: Callable
    eval_step: Callable
    grads: Callable
    compression: GradCompression | None = None
    outer_steps: tuple[Callable, ...] = ()
    overlapped_steps: tuple[Callable, ...] = ()
    reduce_metrics: Callable | None = None

    def outer_step_after(self, step: int) -> Callable:
        """The outer step due after train step ``step`` (``outer_due``): its fragment's, when streaming."""
        return self.outer_steps[self.plan.outer.settings.fragment_due(step)]

    def train_step_for(self, step: int) -> Callable:
        """The program of train step ``step``: ``train_step``, or with ``outer.overlap_steps: 1`` after a
        step an outer step is due after, that fragment's overlapped step (the outer step inside it)."""
        if self.overlapped_steps and step > 1 and self.plan.outer.settings.due(step - 1):
            return self.overlapped_steps[self.plan.outer.settings.fragment_due(step - 1)]
        return self.train_step

    def evaluated(self, params, opt_state):
        """The network held-out evaluation scores (``eval_step``'s first argument): ``params``; under DiLoCo
        the outer parameters, ``opt_state["anchor"]`` (streaming: each fragment as of its own last outer step)."""
        return params if self.plan.outer is None else opt_state["anchor"]

    def anchor_step(self, step: int) -> int | None:
        """After train step ``step``, the last step whose outer step the anchor holds (0: none yet; streaming:
        the newest fragment's, each other one H/F steps older than the next); None without ``outer``."""
        if self.plan.outer is None:
            return None
        settings = self.plan.outer.settings
        stride = settings.every // settings.fragments
        return max(step - settings.overlap, 0) // stride * stride  # overlapped: it lands one step later

    def checkpoint_layout(self) -> dict:
        """What a checkpoint records about how this plan lays out the state (``shardlib.training.state_layout``)."""
        return layout_meta(self.plan.layer_order, error_feedback_layout(self.compression), self.shardings.replicas)

    def outer_due(self, step: int) -> bool:
        """Whether an outer step program follows train step ``step`` (DiLoCo: every H-th, or H/F-th when
        streaming; never without ``outer``, nor when overlapped: ``train_step_for`` has it then)."""
        return self.plan.outer is not None and not self.overlapped_steps and self.plan.outer.settings.due(step)

    def scalar_metrics(self, metrics: list[dict]) -> list[dict]:
        """Train steps' metrics as replicated scalars, all in one program (DiLoCo's are per replica until then)."""
        return metrics if self.reduce_metrics is None else self.reduce_metrics(metrics)

    def state_from(self, params):
        """(params, opt_state) of a fresh optimizer around ``params`` (one network, e.g. another run's).

        DiLoCo: every replica and the anchor start from ``params``.
        """
        replicas = self.shardings.replicas

        def make(p):
            p = p if replicas is None else replicate(p, replicas)
            return p, self.tx.init(p)

        return jax.jit(make, out_shardings=(self.shardings.params, self.shardings.opt_state))(params)

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.plan.batch_sharding

    def init_state(self):
        """Fresh (params, opt_state), created in their shards."""
        return init_state(self.cfg.model, self.cfg.seed, self.tx, self.shardings, self.plan.layer_order)

    def loader(self, tokens: np.ndarray, *, seed: int, position: int = 0) -> BatchLoader:
        return BatchLoader(
            tokens,
            self.cfg.batch_size,
            self.cfg.seq_len,
            self.batch_sharding,
            seed=seed,
            position=position,
        )


def setup_training(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    plan: ParallelPlan | None = None,
    *,
    optimizer: optax.GradientTransformation | None = None,
) -> TrainingSetup:
    """The plan of ``cfg`` on ``mesh`` (or the one given) and the jitted steps built from it.

    ``optimizer`` replaces the config's AdamW (under DiLoCo: the inner optimizer), e.g. plain
    SGD in tests; ``faults.nan_policy`` still wraps it.
    """
    plan = plan or build_plan(cfg, mesh)
    model = abstract_model(cfg.model)
    base = optimizer or make_optimizer(cfg.optimizer, cfg.steps, model.logical_axes)
    tx = optimizer_for_policy(base, cfg.faults)
    if plan.outer is not None:
        return _setup_diloco(cfg, mesh, plan, model, tx)
    shardings = state_shardings(model, tx, plan.rules, mesh)
    grads_fn = make_grads_fn(model, plan, shardings)
    compression = make_compression(model, plan, shardings)
    if compression is not None:  # the residuals join the optimizer state (and its checkpoints)
        tx, shardings = compression.wrap(tx, shardings)
    return TrainingSetup(
        cfg,
        mesh,
        plan,
        model,
        tx,
        shardings,
        make_train_step(grads_fn, tx, shardings, plan.batch_sharding, compression),
        make_eval_step(model.graphdef, shardings, plan),
        jax.jit(lambda params, batch: grads_fn(params, batch)[:2]),  # (loss, grads), without metrics
        compression,
    )


def _setup_diloco(
    cfg: Config, mesh: jax.sharding.Mesh, plan: ParallelPlan, model: AbstractModel, inner_tx
) -> TrainingSetup:
    """DiLoCo or local SGD: one replica's shardings and gradients, wrapped per replica (module docstring)."""
    replica = plan.outer
    axes = replica.settings.replica_axes
    inside = state_shardings(model, inner_tx, replica.plan.rules, mesh)  # one replica's layout
    check_moments(inside.opt_state, replica.settings.moments)
    outer_tx = outer_optimizer(replica.settings)
    compression = make_outer_compression(model, plan, inside.params, model_fragments(model, replica.settings.fragments))
    tx = diloco_optimizer(inner_tx, outer_tx, axes, compression and compression.init_error_feedback)
    opt_state = {
        "inner": jax.tree.map(lambda s: per_replica(s, axes), inside.opt_state),
        "anchor": inside.params,
        "outer": optimizer_shardings(outer_tx, model.params, inside.params, mesh),
    }
    if compression is not None:
        opt_state["error_feedback"] = compression.error_feedback_shardings()
    params = jax.tree.map(lambda s: per_replica(s, axes), inside.params)
    shardings = StateShardings(params, opt_state, replicas=replica.replicas)
    grads_fn = make_grads_fn(model, replica.plan, inside)
    steps = make_diloco_steps(model, grads_fn, tx, outer_tx, shardings, plan, compression)
    return TrainingSetup(
        cfg,
        mesh,
        plan,
        model,
        tx,
        shardings,
        steps.inner,
        steps.eval,
        steps.grads,
        compression,
        outer_steps=steps.outer,
        overlapped_steps=steps.overlapped,
        reduce_metrics=steps.metrics,
    )
