"""The training loop's checks and output: token ids, eval_batches 0, diverging states, console lines.

One setup serves every short run here (configs differ only in what the loop alone
reads), so the steps compile once; the lr=1e6 run compiles its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import struct
import sys
import termios
import threading

import jax
import numpy as np
import PIL.Image
import pytest

from shardlib.training.checkpoint import Checkpointer
from shardlib.training.data import load_token_splits
from shardlib.training.faults import TrainingDiverged
from shardlib.training.metrics import loss_figure, read_metrics
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import run_title, setup_training, train
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
    assert [row["split"] for row in rows] == ["train", "train", "train"], rows
    assert all(np.isfinite(result.losses)) and len(result.losses) == 4


# --------------------------------------------------------------------------- console


def assert_console_lines(lines: list[str], result, run_dir) -> None:
    """Compiling announced and timed; a line per logged step (1, 2, 4) with the held-out loss where computed
    and, once a step time is known, the ETA; the last line says where the outputs are."""
    compiling = lines.index("compiling the training step...")
    assert re.fullmatch(r"compiled in \d+\.\d s", lines[compiling + 1]), lines
    steps = [line for line in lines if line.startswith("step ") and "/4" in line]
    held_out = dict(result.eval_losses)
    assert sorted(held_out) == [2, 4]
    assert [int(line.split()[1].split("/")[0]) for line in steps] == [1, 2, 4], steps
    assert re.fullmatch(rf"step 1/4 \| loss {result.losses[0]:.4f}", steps[0]), steps[0]
    for line, step in zip(steps[1:], (2, 4), strict=True):
        expected = (
            rf"step {step}/4 \| loss {result.losses[step - 1]:.4f} \| held-out {held_out[step]:.4f} \| "
            rf"[\d,]+ tokens/s \| [\d.e-]+ s/step \| ETA \d+s"
        )
        assert re.fullmatch(expected, line), line
    assert steps[-1].endswith("ETA 0s")
    assert lines.index(steps[0]) > compiling + 1
    assert lines[-1] == f"outputs in {run_dir}: metrics.jsonl, tb/ (TensorBoard), loss.png, config.json, checkpoints/4"


def test_console_lines_without_a_progress_bar(tmp_path, setup):
    lines: list[str] = []
    result = train(loop_config(tmp_path), setup.mesh, setup=setup, progress=False, log=lines.append)
    assert_console_lines(lines, result, tmp_path)


def test_console_lines_when_stdout_is_not_a_terminal(tmp_path, setup, monkeypatch):
    """A progress bar in a log file is noise: with stdout redirected the lines replace it, with an ETA."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    lines: list[str] = []
    result = train(loop_config(tmp_path), setup.mesh, setup=setup, progress=True, log=lines.append)
    assert_console_lines(lines, result, tmp_path)


def screen(output: str) -> list[str]:
    """The lines a terminal shows for ``output``: \\r returns to column 0 and overwrites, \\n starts a line,
    escape sequences are dropped (a progress bar at position 0 needs no other)."""
    lines, col = [[]], 0
    for ch in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output):
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
    return ["".join(line).rstrip() for line in lines if "".join(line).strip()]


def train_in_a_terminal(run_dir, setup, monkeypatch, columns: int):
    """``train`` as ``train.py`` runs it in a terminal ``columns`` wide (a pty: stdout and stderr), and its screen."""
    master, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    chunks: list[bytes] = []

    def drain():
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer closed it
            while chunk := os.read(master, 65536):
                chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal = os.fdopen(follower, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        result = train(loop_config(run_dir), setup.mesh, setup=setup)  # progress bar and print: the defaults
    finally:
        terminal.close()
        reader.join(timeout=10)
        os.close(master)
    return result, screen(b"".join(chunks).decode(errors="replace"))


def test_a_terminal_shows_the_bar_with_compiling_and_held_out_losses_on_lines_of_their_own(
    tmp_path, setup, monkeypatch
):
    result, lines = train_in_a_terminal(tmp_path, setup, monkeypatch, columns=100)
    assert "compiling the training step..." in lines, lines
    assert any(re.fullmatch(r"compiled in \d+\.\d s", line) for line in lines), lines
    for step, loss in result.eval_losses:
        assert f"step {step}/4 | held-out {loss:.4f}" in lines, lines
    assert any(re.match(r"train: 100%\|.*\| 4/4 ", line) for line in lines), lines
    assert not any(line.startswith("step ") and "loss" in line.split(" | ")[1] for line in lines), "bar and lines"
    assert lines[-1].startswith(f"outputs in {tmp_path}: "), lines


def test_a_terminal_of_0_columns_gets_the_console_lines(tmp_path, setup, monkeypatch):
    result, lines = train_in_a_terminal(tmp_path, setup, monkeypatch, columns=0)
    lines = [line for line in lines if not line.startswith("steps 1..4: ")]  # the summary, before the outputs
    assert_console_lines(lines, result, tmp_path)


# --------------------------------------------------------------------------- the loss curve


def test_the_loss_curve_starts_at_the_initial_loss_and_names_the_run(tmp_path, setup):
    """Step 1 is logged whatever log_every says, so loss.png starts at the initial loss; its title (and the PNG's
    Title text) names the run directory, the model's size, the preset, the mesh and the schedule."""
    cfg = loop_config(tmp_path)
    result = train(cfg, setup.mesh, setup=setup, **quiet)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 4]
    (train_line, _) = loss_figure(records).axes[0].lines
    assert (train_line.get_xdata()[0], train_line.get_ydata()[0]) == (1, result.losses[0])
    title = PIL.Image.open(tmp_path / "loss.png").text["Title"]
    assert title == run_title(cfg, setup.mesh)
    assert title.splitlines() == [
        str(tmp_path),
        "35K-parameter transformer, dp on data=4 x model=2 (8 cpu devices)",
        "4 steps of 16 x 16 tokens, lr 0.01",
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
    # Steps 2 and 3 are not logged (step 1 is: the initial loss): nothing is read from their dispatch to the next one's.
    assert [started[s + 1] - started[s] for s in (2, 3)] == [0, 0], started
    assert len(reads) > started[4]  # step 4, logged and saved, reads its metrics: the counter sees them
