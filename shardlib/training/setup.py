"""Everything static about a run on a mesh: its plan, shardings and jitted steps.

``setup_training(cfg, mesh)`` builds the ``ParallelPlan`` once and derives the
rest from it: the abstract model, the optimizer, where every state leaf lives,
and the train, eval and gradient steps (compiled on first call). The training
loop (``shardlib.training.trainer``), the report and the tests all start here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding

from shardlib.parallel.compression import GradCompression
from shardlib.training.config import Config
from shardlib.training.data import BatchLoader
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
    eval_step(params, batch) -> loss
    grads(params, batch) -> (loss, grads): the step's gradients, for tests and tools
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

    def checkpoint_layout(self) -> dict:
        """What a checkpoint records about how this plan lays out the state (``shardlib.training.state_layout``)."""
        return layout_meta(self.plan.layer_order, error_feedback_layout(self.compression))

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


def setup_training(cfg: Config, mesh: jax.sharding.Mesh, plan: ParallelPlan | None = None) -> TrainingSetup:
    """The plan of ``cfg`` on ``mesh`` (or the one given) and the jitted steps built from it."""
    plan = plan or build_plan(cfg, mesh)
    model = abstract_model(cfg.model)
    tx = optimizer_for_policy(make_optimizer(cfg.optimizer, cfg.steps, model.logical_axes), cfg.faults)
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
