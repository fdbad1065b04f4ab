"""The training loop's checks and output: token ids, eval_batches 0, diverging states, console lines.

One setup serves every short run here (configs differ only in what the loop alone
reads), so the steps compile once; the lr=1e6 run compiles its own.
"""

from __future__ import annotations

import re
import sys

import jax
import numpy as np
import pytest

from shardlib.training.checkpoint import Checkpointer
from shardlib.training.data import load_token_splits
from shardlib.training.faults import TrainingDiverged
from shardlib.training.metrics import read_metrics
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import setup_training, train
from tests.support import mesh_of, tiny_config

quiet = {"progress": False, "log": lambda _: None}


def loop_config(run_dir, **overrides):
    """4 steps, logged and evaluated every 2, saved only at the end."""
    settings = {"steps": 4, "log_every": 2, "eval_every": 2, "checkpoint": {"every": 0, "keep": 2}} | overrides
    return tiny_config(run_dir, **settings)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return setup_training(loop_config(tmp_path_factory.mktemp("setup")), mesh_of(data=4, model=2))


# --------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("vocab_size", [128, 64])
def test_token_ids_beyond_the_vocabulary_are_an_error_at_start(tmp_path, vocab_size):
    """Byte tokens on a smaller vocabulary: NaN held-out loss and exit 0 (128), or "diverged" at step 1 (64)."""
    train_tokens, _ = load_token_splits(tiny_config().data)
    top = int(train_tokens.max())
    cfg = tiny_config(tmp_path, model={"vocab_size": vocab_size})
    message = (
        f"data source 'stdlib' (this Python's standard library) holds token id {top} in its train split, "
        f"but model.vocab_size is {vocab_size}: every id must be below vocab_size"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        train(cfg, mesh_of(devices=1), **quiet)
    assert not (tmp_path / "metrics.jsonl").exists(), "training started anyway"


# --------------------------------------------------------------------------- evaluation


def test_eval_batches_0_turns_held_out_evaluation_off(tmp_path, setup):
    result = train(loop_config(tmp_path, eval_batches=0), setup.mesh, setup=setup, **quiet)
    assert result.eval_losses == []
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["split"] for row in rows] == ["train", "train"], rows
    assert all(np.isfinite(result.losses)) and len(result.losses) == 4


# --------------------------------------------------------------------------- console


def test_console_lines_without_a_progress_bar(tmp_path, setup):
    """Compiling is announced and timed; each logged step is one line, with the held-out loss when computed."""
    lines: list[str] = []
    result = train(loop_config(tmp_path), setup.mesh, setup=setup, progress=False, log=lines.append)
    compiling = lines.index("compiling the training step...")
    assert re.fullmatch(r"compiled in \d+\.\d s", lines[compiling + 1]), lines
    steps = [line for line in lines if line.startswith("step ") and "/4" in line]
    for line, (step, eval_loss) in zip(steps, result.eval_losses, strict=True):
        loss = result.losses[step - 1]
        expected = (
            rf"step {step}/4 \| loss {loss:.4f} \| held-out {eval_loss:.4f} \| [\d,]+ tokens/s \| [\d.e-]+ s/step"
        )
        assert re.fullmatch(expected, line), line
    assert [s for s, _ in result.eval_losses] == [2, 4]
    assert lines.index(steps[0]) > compiling + 1


def test_console_lines_when_stdout_is_not_a_terminal(tmp_path, setup, monkeypatch):
    """A progress bar in a log file is noise: with stdout redirected the lines replace it."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    lines: list[str] = []
    train(loop_config(tmp_path), setup.mesh, setup=setup, progress=True, log=lines.append)
    assert [line.split(" | ")[0] for line in lines if line.startswith("step ") and "/4" in line] == [
        "step 2/4",
        "step 4/4",
    ]


# --------------------------------------------------------------------------- divergence


def test_lr_1e6_stops_before_the_diverged_state_reaches_a_checkpoint(tmp_path):
    """Update 2 (lr 5e5) blows the weights up while the losses of steps 1 and 2 are normal;
    before the probe, checkpoint 2 held them and the advised resume diverged again."""
    cfg = tiny_config(tmp_path, steps=4, optimizer={"lr": 1e6}, checkpoint={"every": 1, "keep": 5})
    run = setup_training(cfg, mesh_of(data=4, model=2))
    good = tmp_path / "checkpoints" / "1"
    message = (
        r"the state after step 2 has parameter norm [\d.e+]+, [\d.e+]+ x the norm one update before "
        r"\(faults\.max_norm_growth=2\); stopped before "
        rf"saving it\. the last good checkpoint is {re.escape(str(good))}: resume from it with a lower optimizer\.lr"
    )
    with pytest.raises(TrainingDiverged, match=message):
        train(cfg, run.mesh, setup=run, **quiet)
    checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=5)
    assert checkpointer.all_steps() == [1]
    params, _, _ = checkpointer.restore(1, *abstract_state(run.model, run.tx, run.shardings))
    checkpointer.close()
    largest = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(jax.device_get(params)))
    assert largest < 10, f"checkpoint 1 holds weights up to {largest}"


# --------------------------------------------------------------------------- host syncs


def test_steps_between_log_steps_fetch_nothing_from_the_devices(tmp_path, setup, monkeypatch):
    """Between log steps the host only dispatches: no array is read back (loss, norm or flag),
    so it runs ahead of the devices. Counted where every read of a jax.Array ends up: its
    ``_value`` (``float()``, ``np.asarray``, ``jax.device_get``); XLA:CPU arrays live in host
    memory, so ``jax.transfer_guard`` cannot see these reads here."""
    from jax._src.array import ArrayImpl

    from shardlib.training.loop import StepLoop

    reads = []
    value = ArrayImpl._value
    monkeypatch.setattr(ArrayImpl, "_value", property(lambda self: reads.append(1) or value.fget(self)))
    started, dispatch = {}, StepLoop._dispatch  # step -> reads so far when it was dispatched

    def counted(self, step, *, first):
        started[step] = len(reads)
        return dispatch(self, step, first=first)

    monkeypatch.setattr(StepLoop, "_dispatch", counted)
    result = train(loop_config(tmp_path, log_every=4, eval_batches=0), setup.mesh, setup=setup, **quiet)
    assert len(result.losses) == 4
    # Steps 1-3 are not logged: nothing is read from their dispatch to the next one's.
    assert [started[s + 1] - started[s] for s in (1, 2, 3)] == [0, 0, 0], started
    assert len(reads) > started[4]  # step 4, logged and saved, reads its metrics: the counter sees them
