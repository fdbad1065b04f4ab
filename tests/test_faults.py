"""Faults: hard kills at any moment, preemption signals, NaN losses, unusable run directories.

The kill and signal tests run train.py as a real process on 8 emulated CPU devices and
compare every loss it logs, bitwise, with an uninterrupted run in this process on the
same mesh (same device count, same XLA flags: the same machine code). Every trial must
land its first kill before the run ends. ``make test`` runs all twelve kill trials;
``make test-quick`` (``-m 'not slow'``) only the first two.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import random
import signal
import time

import jax
import numpy as np
import pytest

from shardlib.training import faults
from shardlib.training.checkpoint import TMP_MARKER, Checkpointer
from shardlib.training.cli import train_main
from shardlib.training.config import FaultsConfig
from shardlib.training.faults import RunDirError, TrainingDiverged
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import TrainingSetup, TrainResult, setup_training, train
from tests import procs
from tests.support import mesh_of, tiny_config

STEPS = 9
MESH_FILE = "meshes/cpu-8.yaml"  # data 4 x model 2, as mesh_of(data=4, model=2) here
quiet = {"progress": False, "log": lambda _: None}


def fault_config(run_dir: pathlib.Path, **overrides):
    return tiny_config(run_dir, steps=STEPS, checkpoint={"every": 3, "keep": 2}, **overrides)


@dataclasses.dataclass(frozen=True)
class Reference:
    losses: list[float]  # of steps 1..STEPS, uninterrupted
    setup: TrainingSetup  # compiled once, reused by every restart in this process

    def resume(self, run_dir: pathlib.Path, log=lambda _: None) -> TrainResult:
        return train(fault_config(run_dir), self.setup.mesh, progress=False, log=log, setup=self.setup)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    run_dir = tmp_path_factory.mktemp("reference")
    setup = setup_training(fault_config(run_dir), mesh_of(data=4, model=2))
    result = train(fault_config(run_dir), setup.mesh, setup=setup, **quiet)
    assert len(result.losses) == STEPS
    return Reference(result.losses, setup)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("compile-cache")


def start_train(run_dir: pathlib.Path, cache: pathlib.Path) -> procs.Proc:
    config = procs.write_config(fault_config(run_dir), run_dir.parent / f"{run_dir.name}.yaml")
    return procs.Proc(["train.py", "--config", str(config), "--mesh", MESH_FILE, "--no-progress"], procs.env(cache))


def complete_steps(run_dir: pathlib.Path) -> list[int]:
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def partial_saves(run_dir: pathlib.Path) -> list[str]:
    directory = run_dir / "checkpoints"
    return sorted(p.name for p in directory.iterdir() if TMP_MARKER in p.name) if directory.is_dir() else []


def assert_losses_match(run_dir: pathlib.Path, reference: Reference) -> None:
    """Every loss any run logged (killed, restarted or finishing) equals the uninterrupted one, bitwise."""
    rows = procs.train_rows(run_dir)
    assert {row["step"] for row in rows} == set(range(1, STEPS + 1)), "some steps were never trained"
    wrong = [(row["step"], row["loss"], reference.losses[row["step"] - 1]) for row in rows]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"(step, logged, uninterrupted) that differ: {wrong}"


# --------------------------------------------------------------------------- SIGKILL


@dataclasses.dataclass(frozen=True)
class Kill:
    """When to SIGKILL: ``save``: as soon as the save of step >= ``step`` is under way;
    ``step``: ``delay`` s after step >= ``step`` is logged; ``start``: ``delay`` s after launch
    (importing, compiling or restoring)."""

    when: str
    step: int = 0
    delay: float = 0.0


def kill_plan(seed: int) -> list[Kill]:
    """One to three kills, drawn from ``seed``; each hits the run that restarted after the one before.

    Trial 0 kills during a save, trial 1 at a random moment after a random step: the two
    that run by default.
    """
    rng = random.Random(seed)
    kinds = {0: ["save"], 1: ["step"]}.get(seed) or rng.choices(["save", "step", "start"], k=rng.randint(1, 3))
    plan = []
    for kind in kinds:
        if kind == "save":
            plan.append(Kill("save", step=rng.randrange(3, STEPS + 1, 3)))
        elif kind == "step":
            plan.append(Kill("step", step=rng.randint(1, STEPS - 1), delay=rng.uniform(0, 0.3)))
        else:
            plan.append(Kill("start", delay=rng.uniform(0.5, 8.0)))
    return plan


def saving_at_least(run_dir: pathlib.Path, step: int, since_ns: int = 0) -> bool:
    """A save of step >= ``step`` is under way: its temporary directory was written after ``since_ns``
    (a restart leaves the partial saves of a killed run where they are: those do not count)."""
    directory = run_dir / "checkpoints"
    return any(
        int(name.split(".")[0]) >= step and _mtime_ns(directory / name) > since_ns for name in partial_saves(run_dir)
    )


def _mtime_ns(path: pathlib.Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # the save completed (renamed) meanwhile
        return 0


def run_until_killed(run_dir: pathlib.Path, cache: pathlib.Path, kill: Kill) -> procs.Proc | None:
    """Starts train.py and SIGKILLs it as ``kill`` says; None if it finished first.

    A delay that would outlast the run is cut short when this process logs the last
    step: the kill then lands in the final save or the shutdown, never after the end.
    """
    logged_before = len(procs.train_rows(run_dir))
    started_ns = time.time_ns()
    proc = start_train(run_dir, cache)
    proc.started_ns = started_ns
    moment = {
        "save": lambda: saving_at_least(run_dir, kill.step, started_ns),
        "step": lambda: procs.last_logged_step(run_dir) >= kill.step,
        "start": lambda: True,
    }[kill.when]

    def finishing() -> bool:
        return any(row["step"] == STEPS for row in procs.train_rows(run_dir)[logged_before:])

    procs.wait_until(lambda: moment() or proc.popen.poll() is not None, 300, what=str(kill))
    deadline = time.monotonic() + kill.delay
    while proc.popen.poll() is None and time.monotonic() < deadline and not finishing():
        time.sleep(0.005)
    if proc.popen.poll() is not None:
        assert proc.wait(timeout=60) == 0, proc.output[-4000:]
        return None
    proc.popen.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return proc


def assert_resumed_from(output: str, run_dir: pathlib.Path, complete: list[int], partial: list[str]) -> None:
    """What a restart must say about the files the last kill left (if it got as far as saying anything)."""
    resumed = f"resumed from {run_dir / 'checkpoints'}/"
    if complete and complete[-1] == STEPS:  # killed after its last save: nothing is left to train
        assert f"{run_dir} already holds step {STEPS} of {STEPS}: nothing to train" in output, output[-3000:]
        return
    if complete:
        assert f"{resumed}{complete[-1]} " in output, output[-3000:]
    else:
        assert resumed not in output, output[-3000:]
    for name in partial:  # recognised as incomplete, never restored from
        assert f"ignoring {run_dir / 'checkpoints' / name}: a save that never completed" in output, output[-3000:]


SLOW_TRIALS = 7  # with the 2 quick ones, 9 seeded trials of several kills each: the suite's 10-minute budget


@pytest.mark.parametrize(
    "seed",
    [0, 1] + [pytest.param(seed, marks=pytest.mark.slow) for seed in range(2, 2 + SLOW_TRIALS)],
)
def test_sigkill_at_any_moment_loses_nothing(tmp_path, reference, compile_cache, seed):
    """Kills at random moments (fixed seeds), some during saves; every restart resumes from the
    newest complete checkpoint, and all losses equal the uninterrupted run's bitwise."""
    run_dir = tmp_path / "run"
    left: tuple[list[int], list[str]] | None = None  # (complete, partial) checkpoints after the last kill
    landed = 0
    for kill in kill_plan(seed):
        nothing_to_train = complete_steps(run_dir)[-1:] == [STEPS]  # the last kill came after the final save
        proc = run_until_killed(run_dir, compile_cache, kill)
        if left is not None and proc is not None and "params | mesh" in proc.output:
            assert_resumed_from(proc.output, run_dir, *left)
        if proc is None:
            # Only a run with nothing left to train may end before its kill: any other would
            # make this trial pass without testing a kill.
            assert nothing_to_train, f"trial {seed}: {kill} never landed: the run finished first"
            print(f"trial {seed}: {kill}: nothing left to train, the run finished first")
            left = None
            break
        landed += 1
        if kill.when == "save":
            assert saving_at_least(run_dir, kill.step, proc.started_ns), f"{kill}: the kill did not land during a save"
        left = complete_steps(run_dir), partial_saves(run_dir)
        print(f"trial {seed}: {kill}: killed; complete checkpoints {left[0]}, partial {left[1]}")
    if left is not None:  # the last start, in this process, from the files the last kill left
        log: list[str] = []
        result = reference.resume(run_dir, log=log.append)
        assert_resumed_from("\n".join(log) + "\n", run_dir, *left)
        assert (result.start_step, result.final_step) == ((left[0] or [0])[-1], STEPS)
        assert result.losses == reference.losses[result.start_step :]
    assert landed >= 1, f"trial {seed}: no kill landed"
    assert complete_steps(run_dir)[-1] == STEPS
    assert_losses_match(run_dir, reference)


# --------------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_a_complete_checkpoint_exits_0_and_resumes(tmp_path, reference, compile_cache, signum):
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, compile_cache)
    procs.wait_until(lambda: procs.last_logged_step(run_dir) >= 3, 300, proc, "step 3")
    proc.popen.send_signal(signum)
    assert proc.wait(timeout=120) == 0, proc.output[-4000:]
    stopped = procs.last_logged_step(run_dir)
    assert stopped < STEPS, "the run ended before the signal arrived"
    assert f"stopped by {signum.name} after step {stopped}" in proc.output, proc.output[-2000:]
    assert stopped in complete_steps(run_dir) and not partial_saves(run_dir)

    resumed = reference.resume(run_dir)
    assert resumed.start_step == stopped
    assert resumed.losses == reference.losses[stopped:]
    assert_losses_match(run_dir, reference)


# --------------------------------------------------------------------------- NaN and Inf


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """Logged every 10 steps, saved every 3: the check before the save at 6 catches step 5."""
    cfg = tiny_config(
        tmp_path / "run", steps=8, log_every=10, checkpoint={"every": 3, "keep": 5}, faults={"inject_nan_at": [5]}
    )
    config = procs.write_config(cfg, tmp_path / "nan.yaml")
    status = train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress"])
    assert status == faults.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "error: loss nan and gradient norm nan at step 5; stopped before saving it" in err, err
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", every=3, keep=5)
    assert checkpointer.all_steps() == [3]
    run = setup_training(cfg, mesh_of(data=4, model=2))
    params, opt_state, _ = checkpointer.restore(3, *abstract_state(run.model, run.tx, run.shardings))
    checkpointer.close()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get((params, opt_state))))


def test_nan_skip_leaves_the_state_untouched_until_too_many_in_a_row(tmp_path):
    """Steps 2, 4 and 5 are NaN: 2 and 4 are skipped, 3 trains, and 5 is the second in a row."""
    cfg = tiny_config(
        tmp_path,
        steps=7,
        checkpoint={"every": 1, "keep": 10},
        faults={"nan_policy": "skip", "max_consecutive_skips": 2, "inject_nan_at": [2, 4, 5]},
    )
    run = setup_training(cfg, mesh_of(data=4, model=2))
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row up to step 5 had a non-finite loss"):
        train(cfg, run.mesh, setup=run, **quiet)

    checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=10)
    assert checkpointer.all_steps() == [1, 2, 3, 4], "step 5 must not be saved"
    states, metas = {}, {}
    for step in (1, 2, 3, 4):
        params, opt_state, metas[step] = checkpointer.restore(step, *abstract_state(run.model, run.tx, run.shardings))
        states[step] = jax.tree.leaves(jax.device_get((params, opt_state)))
    checkpointer.close()
    for before, after in [(1, 2), (3, 4)]:  # a skipped step changes neither parameters nor optimizer state
        for a, b in zip(states[before], states[after], strict=True):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(states[2], states[3], strict=True)), "step 3 did not train"
    assert [metas[s]["data_position"] for s in (1, 2, 3, 4)] == [1, 2, 3, 4], "skipped steps still use their batch"
    assert [metas[s]["skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
    rows = procs.train_rows(tmp_path)
    assert [math.isnan(r["loss"]) for r in rows] == [False, True, False, True]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 1, 1, 2]


# --------------------------------------------------------------------------- run directory


def test_unwritable_run_dir_is_an_error_at_start(tmp_path, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the run directory's parent should be")
    config = procs.write_config(tiny_config(blocker / "run"), tmp_path / "cfg.yaml")
    assert train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: run_dir {blocker / 'run'} cannot be written (Not a directory" in err, err


def test_full_disk_is_an_error_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "_free_bytes", lambda path: 1000)
    with pytest.raises(RunDirError, match=r"has 1000 B free, but one checkpoint of this run needs about [\d.]+ KiB"):
        train(tiny_config(tmp_path), mesh_of(devices=1), **quiet)
    assert not (tmp_path / "metrics.jsonl").exists(), "training started anyway"


# --------------------------------------------------------------------------- loss spikes


def spike_guard(tmp_path: pathlib.Path, last_checkpoint: int | None = None, **settings) -> faults.NanGuard:
    cfg = FaultsConfig(**settings)
    return faults.NanGuard(
        cfg, vocab_size=256, checkpoint_dir=tmp_path / "checkpoints", last_checkpoint=last_checkpoint
    )


def step_metrics(losses: list[float], norms: list[float] | None = None) -> list[dict]:
    norms = norms or [10.0] * len(losses)
    return [
        {"loss": np.float32(loss), "grad_norm": np.float32(1.0), "param_norm": np.float32(norm)}
        for loss, norm in zip(losses, norms, strict=True)
    ]


def test_a_loss_spike_stops_naming_the_step_the_loss_the_median_and_the_last_good_checkpoint(tmp_path):
    guard = spike_guard(tmp_path, last_checkpoint=4)
    with pytest.raises(TrainingDiverged) as caught:
        guard.review(3, step_metrics([5.5, 5.0, 4.6, 4.3, 4.1, 4.0, 40.0]))
    assert str(caught.value) == (
        "loss 40 at step 9, above 4 x 4.45, the median loss of the 6 steps before (faults.spike_factor, "
        f"faults.spike_window); stopped before saving it. the last good checkpoint is {tmp_path}/checkpoints/4: "
        "resume from it with a lower optimizer.lr"
    )


def test_the_state_an_update_makes_is_checked_by_its_parameter_norm(tmp_path):
    """The losses of steps 1..s say nothing of the state update s made; its norm does."""
    guard = spike_guard(tmp_path, max_norm_growth=2)
    guard.review(1, step_metrics([5.5, 5.4, 5.3], [10.0, 10.5, 19.9]))  # growth up to 2x passes
    with pytest.raises(
        TrainingDiverged,
        match=r"^the state after step 4 has parameter norm 50, 2\.51 x the norm one update before "
        r"\(faults\.max_norm_growth=2\); stopped before saving it\. .* holds no checkpoint of this run",
    ):
        guard.review(4, step_metrics([5.2], [50.0]))
    with pytest.raises(TrainingDiverged, match=r"^the state after step 1 has parameter norm inf; stopped before"):
        spike_guard(tmp_path).review(1, step_metrics([5.0], [np.inf]))


def test_healthy_training_never_trips_the_spike_guard(tmp_path):
    """A fast early fall from ln(256), noise of +-25%, a late bump: all far below 4 x the median."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, 301)
    curve = 1.5 + 4.1 * np.exp(-steps / 40) + 0.3 * np.exp(-(((steps - 200) / 10) ** 2))
    losses = curve * rng.uniform(0.75, 1.25, steps.size)
    guard = spike_guard(tmp_path)
    assert guard.review(1, step_metrics(list(losses))) == pytest.approx(losses, rel=1e-6)
    early = spike_guard(tmp_path)  # fewer than spike_warmup losses: no median to trust yet
    early.review(1, step_metrics([5.5, 30.0, 5.4, 5.3]))
    off = spike_guard(tmp_path, spike_factor=None)
    off.review(1, step_metrics([5.5] * 10 + [1e6]))


def test_a_spike_warmup_beyond_the_window_is_a_config_error():
    with pytest.raises(ValueError, match=r"spike_warmup \(5\) exceeds spike_window \(3\)"):
        FaultsConfig(spike_window=3)
