"""Checkpoints record how the plan laid the state out, and restore onto any other plan.

* An interleaved pipeline stores its layers in its own order: a checkpoint
  saved on pipe 2 with 2 virtual stages restores onto pipe 1, pipe 4 and
  virtual stages 1 with the same next-batch loss.
* Compressed-gradient residuals belong to the mesh that made them: restoring
  onto another mesh resets them with a warning, never loads them into the
  wrong devices' rows; on the same mesh they come back as saved.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from shardlib.training.checkpoint import Checkpointer
from shardlib.training.data import load_token_splits
from shardlib.training.setup import setup_training
from shardlib.training.trainer import _restore_or_init, train
from tests.support import mesh_of, tiny_config

SAVED = 2
PIPELINE = {"schedule": "interleaved-1f1b", "virtual_stages": 2, "microbatches": 2}
TARGETS = {
    "the same plan": ({"pipe": 2, "data": 2}, PIPELINE),
    "pipe 1": ({"data": 4}, PIPELINE),
    "pipe 4, one chunk each": ({"pipe": 4}, {"schedule": "1f1b", "microbatches": 2}),
    "pipe 2, virtual stages 1": ({"pipe": 2, "data": 2}, {"schedule": "gpipe", "microbatches": 2}),
}


def _cfg(run_dir, pipeline, **extra):
    raw = {"model": {"n_layers": 4}, "batch_size": 8, "seq_len": 16, "steps": 6, "pipeline": pipeline}
    return tiny_config(run_dir, checkpoint={"every": SAVED, "keep": 3, "async_save": False}, **raw, **extra)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> str:
    """A run dir holding step SAVED of an interleaved run on pipe 2 (v 2)."""
    run_dir = str(tmp_path_factory.mktemp("layout") / "saved")
    train(_cfg(run_dir, PIPELINE), mesh_of(pipe=2, data=2), stop_at=SAVED, progress=False, log=lambda _: None)
    return run_dir


def _next_batch_loss(run_dir, sizes, pipeline) -> tuple[float, list[str]]:
    """The loss of step SAVED + 1 after the trainer's own restore onto ``sizes`` and ``pipeline``, and its log."""
    cfg = _cfg(run_dir, pipeline)
    run = setup_training(cfg, mesh_of(**sizes))
    lines: list[str] = []
    with Checkpointer(f"{run_dir}/checkpoints", every=SAVED, keep=3) as checkpointer:
        step, params, _, meta = _restore_or_init(run, checkpointer, lines.append)
    assert step == SAVED
    batch = run.loader(load_token_splits(cfg.data)[0], seed=cfg.seed, position=int(meta["data_position"])).next()
    return float(run.grads(params, batch)[0]), lines


@pytest.fixture(scope="module")
def reference(saved_run) -> float:
    sizes, pipeline = TARGETS["the same plan"]
    loss, lines = _next_batch_loss(saved_run, sizes, pipeline)
    assert not any("another pipeline's order" in line for line in lines), lines
    return loss


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "the same plan"])
def test_an_interleaved_checkpoint_restores_onto_any_pipeline(saved_run, reference, target):
    loss, lines = _next_batch_loss(saved_run, *TARGETS[target])
    assert any("another pipeline's order" in line for line in lines), lines
    assert abs(loss - reference) <= 1e-5, (target, loss, reference)


def test_residuals_from_another_mesh_restart_from_zero_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, sharding="tp", grad_compression="int8", steps=4, checkpoint={"every": 2})
    train(cfg, mesh_of(data=4, model=2), stop_at=2, progress=False, log=lambda _: None)
    smaller = setup_training(cfg, mesh_of(data=2, model=2))  # another layout of the residuals' rows
    lines: list[str] = []
    with Checkpointer(run_dir / "checkpoints", every=2, keep=3) as checkpointer:
        step, params, opt_state, _ = _restore_or_init(smaller, checkpointer, lines.append)
    assert step == 2
    warning = [line for line in lines if "residuals restart from zero" in line]
    assert len(warning) == 1 and "'data': 4" in warning[0] and "'data': 2" in warning[0], lines
    for name, residual in opt_state["error_feedback"].items():
        assert residual.sharding == smaller.shardings.opt_state["error_feedback"][name]
        assert not np.asarray(residual).any()
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))
