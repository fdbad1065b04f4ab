"""Several processes on JAX's distributed runtime: joining, the launcher, equal losses, cross restores, lost peers.

The launched runs use ``meshes/cpu-2x4.yaml``: 2 processes x 4 emulated CPU devices as
data 4 (2 per process x 2 processes) x model 2, the shape of ``mesh_of(data=4, model=2)``
in this process.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
import re
import shutil
import signal
import threading
import time

import jax
import pytest

from shardlib.cluster import launch
from shardlib.cluster.join import join_settings
from shardlib.cluster.watchdog import EXIT_PEER_LOST, PeerWatchdog
from shardlib.training.trainer import setup_training, train
from tests import procs
from tests.support import mesh_of, tiny_config

quiet = {"progress": False, "log": lambda _: None}
STEPS = 200  # far more than a launched run gets through before it is stopped
REFERENCE_STEPS = 20  # the launched run is killed at step 7, the resumed one ends 2 steps after its newest save
SAME_SHAPE = 1e-6  # 2 x 4 devices against 1 x 8, same mesh shape: only reduction order differs
OTHER_SHAPE = 1e-5  # restored onto data 2 x model 2: as tests/test_checkpoint.py
PEER_TIMEOUT = 5.0


def mp_config(run_dir: pathlib.Path, **overrides):
    defaults = {"steps": STEPS, "sharding": "tp", "checkpoint": {"every": 1000, "keep": 3}, "eval_every": 0}
    return tiny_config(run_dir, **(defaults | overrides))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("compile-cache")


def launch_train(config: pathlib.Path, cache: pathlib.Path) -> procs.Proc:
    args = ["-m", "shardlib.cluster.launch", "--processes", "2", "--grace", "60", "--", "train.py"]
    args += ["--config", str(config), "--mesh", "meshes/cpu-2x4.yaml", "--no-progress"]
    return procs.Proc(args, procs.env(cache))


# --------------------------------------------------------------------------- joining


@pytest.mark.parametrize(
    "kwargs, environ, expected",
    [
        ({}, {}, None),
        ({"distributed": True}, {}, {}),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        ),
        (
            {"coordinator": "h:1", "process_id": 0},
            {"JAX_PROCESS_ID": "1"},
            {"coordinator_address": "h:1", "process_id": 0},
        ),
        # inside srun with 2 tasks: jax.distributed detects SLURM by itself
        ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, {}),
        # an sbatch script is not a job step: no partner process will come
        ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, None),
        ({}, {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ],
)
def test_join_settings(kwargs, environ, expected):
    assert join_settings(**kwargs, environ=environ) == expected


@pytest.mark.parametrize(
    "kwargs, environ, message",
    [
        ({"num_processes": 2, "process_id": 2}, {}, "process id 2 is outside 0..1 for 2 processes"),
        ({"coordinator": "10.0.0.1"}, {}, "coordinator address '10.0.0.1' must be host:port"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        ({"num_processes": 0}, {}, "number of processes must be at least 1, got 0"),
    ],
)
def test_join_settings_errors_name_the_value(kwargs, environ, message):
    with pytest.raises(ValueError, match=message):
        join_settings(**kwargs, environ=environ)


def test_launcher_child_environment():
    env = launch.child_env(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0", "HOME": "/h"},
        "127.0.0.1:555",
        2,
        1,
    )
    assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == (
        "127.0.0.1:555",
        "2",
        "1",
    )
    assert (env["JAX_PLATFORMS"], env["HOME"]) == ("cpu", "/h")
    assert launch.describe_status(-9) == "killed by SIGKILL"
    assert launch.describe_status(4) == "exit status 4 (lost a peer process)"


def test_launcher_shows_progress_bars_sparingly():
    read, write = os.pipe()
    os.write(write, b"start\nbar 1\rbar 2\rbar 3\rbar done\nlast words")
    os.close(write)
    out = io.StringIO()
    launch._pump(os.fdopen(read, "rb"), "[p0] ", out, threading.Lock(), every_s=60)
    assert out.getvalue() == "[p0] start\n[p0] bar 1\n[p0] bar done\n[p0] last words\n"


# --------------------------------------------------------------------------- the watchdog's verdicts


class FakeService:
    """The coordination service's key-value store; ``peers[p](n)`` is what process p has
    published by this process's n-th look (None: nothing new)."""

    def __init__(self, peers: dict, fail: bool = False):
        self.store: dict[str, str] = {}
        self.peers = peers
        self.fail = fail
        self.looks = 0

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self.store[key] = value

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        if self.fail:
            raise jax.errors.JaxRuntimeError("UNAVAILABLE: Socket closed")
        self.looks += 1
        for peer, script in self.peers.items():
            if (value := script(self.looks)) is not None:
                self.store[f"{prefix}{peer}"] = value
        return list(self.store.items())


def verdict(service: FakeService, count: int, timeout_s: float = 2.0) -> tuple[str | None, list[int], float]:
    exits: list[int] = []
    watchdog = PeerWatchdog(timeout_s, exit=exits.append)
    watchdog._client = service
    started = time.monotonic()
    thread = threading.Thread(target=watchdog._run, args=(0, count), daemon=True)
    thread.start()
    thread.join(timeout=4 * timeout_s)
    watchdog._stop.set()
    return watchdog.lost, exits, time.monotonic() - started


def test_watchdog_names_the_silent_peer_and_ignores_finished_ones():
    """Process 1 finishes early ("done"); process 2 stops beating after its third beat."""
    service = FakeService({1: lambda n: str(n) if n < 2 else "done", 2: lambda n: str(min(n, 3))})
    lost, exits, elapsed = verdict(service, count=3)
    # Silent for more than the timeout less two polls (2 - 2 x 0.2 s): then named at once.
    assert re.fullmatch(r"lost process 2 of 3: no sign of life for (1\.[6-9]|2\.[0-2]) s", lost or ""), lost
    assert exits == [EXIT_PEER_LOST]
    assert elapsed <= 0.4 + 2.0 + 0.6, elapsed  # its last beat came at about 0.4 s; 0.6 s for a loaded machine


def test_watchdog_calls_an_unreachable_service_the_loss_of_process_0():
    lost, exits, _ = verdict(FakeService({}, fail=True), count=2)
    assert lost.startswith("lost process 0 of 2, which runs the coordination service (UNAVAILABLE"), lost
    assert exits == [EXIT_PEER_LOST]


# --------------------------------------------------------------------------- two processes at work


def losses_by_step(run_dir: pathlib.Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in procs.train_rows(run_dir)}


def pid_of(proc: procs.Proc, index: int) -> int:
    return next(int(line.split()[-1]) for _, line in proc.lines if line.startswith(f"[launch] process {index}: pid"))


def kill_and_time_the_survivor(proc: procs.Proc, victim: int) -> float:
    """SIGKILLs process ``victim``; seconds until the launcher saw the other one end."""
    killed = time.monotonic()
    os.kill(pid_of(proc, victim), signal.SIGKILL)
    assert proc.wait(timeout=120) == 128 + signal.SIGKILL, proc.output[-4000:]
    ended = proc.line_time(f"[launch] process {1 - victim} ended:")
    assert ended is not None, proc.output[-4000:]
    assert f"[launch] failed: process {victim} was the first to fail (killed by SIGKILL)" in proc.output
    print(
        f"process {victim} killed: process {1 - victim} ended {ended - killed:.2f} s later (timeout {PEER_TIMEOUT} s)"
    )
    return ended - killed


def test_two_processes_match_one_cross_restore_and_survive_a_lost_peer(tmp_path, compile_cache):
    """1 process x 4 devices writes step 3. 2 processes x 4 devices resume it, save every 3
    steps and lose process 1 to SIGKILL: process 0 must name it and exit within the peer
    timeout. 1 process x 4 devices resumes their newest checkpoint. Reference: the step-3
    checkpoint resumed in this process on 8 devices, the launched mesh's shape."""
    start = tmp_path / "start"
    four = setup_training(mp_config(start), mesh_of(data=2, model=2))
    train(mp_config(start), four.mesh, stop_at=3, setup=four, **quiet)
    shutil.copytree(start, tmp_path / "reference")
    reference = train(mp_config(tmp_path / "reference"), mesh_of(data=4, model=2), stop_at=REFERENCE_STEPS, **quiet)
    expected = dict(enumerate(reference.losses, start=4))

    run_dir = tmp_path / "two"
    shutil.copytree(start, run_dir)
    launched_cfg = mp_config(run_dir, checkpoint={"every": 3, "keep": 3}, faults={"peer_timeout_s": PEER_TIMEOUT})
    proc = launch_train(procs.write_config(launched_cfg, tmp_path / "two.yaml"), compile_cache)
    saved = run_dir / "checkpoints" / "6"
    procs.wait_until(lambda: saved.is_dir() and procs.last_logged_step(run_dir) >= 7, 300, proc, "step 7 saved at 6")
    elapsed = kill_and_time_the_survivor(proc, victim=1)
    assert elapsed <= PEER_TIMEOUT + 1.0, f"the survivor took {elapsed:.1f} s"
    assert f"[launch] process 0 ended: exit status {EXIT_PEER_LOST} (lost a peer process)" in proc.output
    assert "[p0] error: lost process 1 of 2: no sign of life for" in proc.output
    for index in (0, 1):
        assert f"[p{index}] resumed from {run_dir / 'checkpoints'}/3 " in proc.output

    launched = losses_by_step(run_dir)
    assert max(launched) < REFERENCE_STEPS - 2, "the launched run got too far before the kill"
    worst = max(abs(loss - expected[step]) for step, loss in launched.items() if step > 3)
    assert worst <= SAME_SHAPE, f"2 x 4 devices differ from 1 x 8 by {worst:.2e}"

    newest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert newest >= 6
    resumed = train(mp_config(run_dir), four.mesh, stop_at=newest + 2, setup=four, **quiet)
    assert resumed.start_step == newest
    worst = max(abs(loss - expected[step]) for step, loss in enumerate(resumed.losses, start=newest + 1))
    assert worst <= OTHER_SHAPE, f"resumed on 4 devices, the losses differ by {worst:.2e}"


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_process_at_one_step(tmp_path, compile_cache):
    run_dir = tmp_path / "run"
    proc = launch_train(procs.write_config(mp_config(run_dir), tmp_path / "cfg.yaml"), compile_cache)
    procs.wait_until(lambda: procs.last_logged_step(run_dir) >= 3, 300, proc, "step 3")
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.output[-4000:]
    stopped = procs.last_logged_step(run_dir)
    assert 3 <= stopped < STEPS
    for index in (0, 1):
        assert f"[p{index}] stopped by SIGTERM after step {stopped}; " in proc.output, proc.output[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [str(stopped)]
    assert "[launch] every process succeeded" in proc.output


@pytest.mark.slow
def test_losing_process_0_ends_the_others_at_once(tmp_path, compile_cache):
    """Process 0 hosts the coordination service: the runtime aborts the others as it goes."""
    run_dir = tmp_path / "run"
    cfg = mp_config(run_dir, faults={"peer_timeout_s": PEER_TIMEOUT})
    proc = launch_train(procs.write_config(cfg, tmp_path / "cfg.yaml"), compile_cache)
    procs.wait_until(lambda: procs.last_logged_step(run_dir) >= 3, 300, proc, "step 3")
    assert kill_and_time_the_survivor(proc, victim=0) <= PEER_TIMEOUT + 1.0
    assert "[launch] process 1 ended: killed by SIGABRT" in proc.output or "lost process 0 of 2" in proc.output


def test_diloco_across_two_processes_matches_one_and_resumes_mid_period(tmp_path, compile_cache):
    """DiLoCo (H = 4) over ``data``, which crosses the two processes: the inner steps, the outer
    all-reduce between them and a save mid-period (step 6), launched. Reference: the same run in this
    process on 8 devices, the launched mesh's shape; then step 6's checkpoint, written by two
    processes, resumed here: steps 7..10 continue the reference."""
    steps, every = 10, 4
    outer = {"algorithm": "diloco", "inner_steps": every}
    cfg = functools.partial(mp_config, steps=steps, outer=outer, checkpoint={"every": 6, "keep": 3})
    reference = train(cfg(tmp_path / "reference"), mesh_of(data=4, model=2), **quiet)
    expected = dict(enumerate(reference.losses, start=1))

    run_dir = tmp_path / "two"
    proc = launch_train(procs.write_config(cfg(run_dir), tmp_path / "two.yaml"), compile_cache)
    assert proc.wait(timeout=300) == 0, proc.output[-4000:]
    launched = losses_by_step(run_dir)
    assert sorted(launched) == list(range(1, steps + 1))
    worst = max(abs(loss - expected[step]) for step, loss in launched.items())
    assert worst <= SAME_SHAPE, f"DiLoCo on 2 x 4 devices differs from 1 x 8 by {worst:.2e}"

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "6", resumed_dir / "checkpoints" / "6")
    resumed = train(cfg(resumed_dir), mesh_of(data=4, model=2), **quiet)
    assert resumed.start_step == 6
    worst = max(abs(loss - expected[step]) for step, loss in enumerate(resumed.losses, start=7))
    assert worst <= SAME_SHAPE, f"resumed from the two processes' mid-period save, the losses differ by {worst:.2e}"
