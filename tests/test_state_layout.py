"""Checkpoints record how the plan laid the state out, and restore onto any other plan.

* An interleaved pipeline stores its layers in its own order: a checkpoint
  saved on pipe 2 with 2 virtual stages restores onto pipe 1, pipe 4 and
  virtual stages 1 with the same next-batch loss.
* Compressed-gradient residuals belong to the mesh that made them: restoring
  onto another mesh resets them with a warning, never loads them into the
  wrong devices' rows; on the same mesh they come back as saved.
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest

from shardlib.training.trainer import train
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


@functools.cache
def _saved(root) -> str:
    """A run dir holding step SAVED of an interleaved run on pipe 2 (v 2)."""
    run_dir = f"{root}/saved"
    train(_cfg(run_dir, PIPELINE), mesh_of(pipe=2, data=2), stop_at=SAVED, progress=False, log=lambda _: None)
    return run_dir


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    return _saved(str(tmp_path_factory.mktemp("layout")))


@pytest.mark.parametrize("target", list(TARGETS))
def test_an_interleaved_checkpoint_restores_onto_any_pipeline(saved_run, target, tmp_path):
    sizes, pipeline = TARGETS[target]
    run_dir = tmp_path / "resumed"
    shutil.copytree(saved_run, run_dir)
    lines: list[str] = []
    result = train(_cfg(run_dir, pipeline), mesh_of(**sizes), stop_at=SAVED + 1, progress=False, log=lines.append)
    assert result.start_step == SAVED
    moved = any("another pipeline's order" in line for line in lines)
    assert moved == (target != "the same plan"), lines
    reference = _next_loss(saved_run)
    assert abs(result.losses[0] - reference) <= 1e-5, (target, result.losses[0], reference)


@functools.cache
def _next_loss(saved_run) -> float:
    """The loss of step SAVED + 1 on the saving plan itself."""
    run_dir = f"{saved_run}-continued"
    shutil.copytree(saved_run, run_dir)
    cfg = _cfg(run_dir, PIPELINE)
    return train(cfg, mesh_of(pipe=2, data=2), stop_at=SAVED + 1, progress=False, log=lambda _: None).losses[0]


def test_residuals_from_another_mesh_restart_from_zero_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, sharding="tp", grad_compression="int8", steps=4, checkpoint={"every": 2})
    train(cfg, mesh_of(data=4, model=2), stop_at=2, progress=False, log=lambda _: None)
    lines: list[str] = []
    result = train(cfg, mesh_of(data=2, model=2), stop_at=3, progress=False, log=lines.append)
    assert result.start_step == 2 and np.isfinite(result.losses).all()
    warning = [line for line in lines if "residuals restart from zero" in line]
    assert len(warning) == 1 and "'data': 4" in warning[0] and "'data': 2" in warning[0], lines
