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

from shardlib.cluster import launch, supervise
from shardlib.cluster.join import join_settings
from shardlib.cluster.watchdog import EXIT_PEER_LOST, PeerWatchdog
from shardlib.training.faults import RunDirError
from shardlib.training.trainer import setup_training, train
from tests import procs
from tests.support import mesh_of, tiny_config

quiet = {"progress": False, "log": lambda _: None}
STEPS = 200  # far more than a launched run gets through before it is stopped
REFERENCE_STEPS = 20  # the launched run is killed at step 7, the resumed one ends 2 steps after its newest save
SAME_SHAPE = 1e-6  # 2 x 4 devices against 1 x 8, same mesh shape: only reduction order differs
OTHER_SHAPE = 1e-5  # restored onto data 2 x model 2: as tests/test_checkpoint.py
PEER_TIMEOUT = 60.0  # the default: a loss must be reported at once all the same
PROMPT = 5.0  # seconds from a kill to the survivor's exit, loaded machine included
# The runtime's own voice (gloo's lines on stdout, glog's and a C++ abort's on stderr): never on the terminal.
RUNTIME_NOISE = re.compile(r"^\[p\d\] (\[Gloo\]|[IWEF]\d{4} \d\d:\d\d|\*\*\* Check failure|\s+@\s+0x|Additional GRPC)")


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

    def __init__(self, peers: dict | None = None, fail: bool = False):
        self.store: dict[str, str] = {}
        self.peers = peers or {}
        self.fail = fail
        self.looks = 0
        self.lock = threading.Lock()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            self.store[key] = value

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
        raise AssertionError("peer_links polls instead (see peer_links._published)")

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        if self.fail:
            raise jax.errors.JaxRuntimeError("UNAVAILABLE: Socket closed")
        with self.lock:
            self.looks += 1
            for peer, script in self.peers.items():
                if (value := script(self.looks)) is not None:
                    self.store[f"{prefix}{peer}"] = value
            return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def watching(service: FakeService, me: int, count: int, timeout_s: float = 2.0, **kwargs) -> PeerWatchdog:
    """A watchdog of process ``me`` of ``count`` on ``service``, its thread running; ``exit`` records."""
    exits: list[int] = []
    watchdog = PeerWatchdog(timeout_s, exit=exits.append, **kwargs)
    watchdog.exits = exits
    watchdog._client, watchdog._me, watchdog._count = service, me, count
    watchdog._thread = threading.Thread(target=watchdog._run, daemon=True)
    watchdog._thread.start()
    return watchdog


def verdict(service: FakeService, count: int, timeout_s: float = 2.0) -> tuple[str | None, list[int], float]:
    started = time.monotonic()
    watchdog = watching(service, 0, count, timeout_s)
    watchdog._thread.join(timeout=4 * timeout_s)
    watchdog._stop.set()
    return watchdog.lost, watchdog.exits, time.monotonic() - started


def test_watchdog_names_the_silent_peer_and_ignores_finished_ones():
    """Process 1 finishes early ("done"); process 2 stops beating after its third beat."""
    service = FakeService({1: lambda n: str(n) if n < 2 else "done", 2: lambda n: str(min(n, 3))})
    lost, exits, elapsed = verdict(service, count=3)
    # Silent for more than the timeout less two polls (2 - 2 x 0.2 s): then named at once, with the timeout.
    assert lost == "lost process 2 of 3: no heartbeat within faults.peer_timeout_s (2 s)", lost
    assert exits == [EXIT_PEER_LOST]
    assert 1.6 <= elapsed <= 0.4 + 2.0 + 0.6, elapsed  # its last beat came at about 0.4 s; 0.6 s for a loaded machine


def test_watchdog_calls_an_unreachable_service_the_loss_of_process_0():
    lost, exits, _ = verdict(FakeService(fail=True), count=2)
    assert lost == "lost process 0 of 2, which runs the coordination service", lost
    assert exits == [EXIT_PEER_LOST]


def test_a_peer_that_ends_is_named_at_once_one_that_leaves_in_order_is_not(tmp_path, capsys):
    """Three watchdogs linked over TCP (``peer_links``) with a 60 s timeout: process 2 leaves in order (its
    block ended), then process 1 vanishes (its links close without a word, as SIGKILL leaves them). Process 0
    names process 1 within a second, and the checkpoint to resume from, and exits 4; its heartbeats alone
    would have taken 58 s."""
    (tmp_path / "checkpoints" / "6").mkdir(parents=True)
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # a save under way: not complete
    service = FakeService()
    dogs = [watching(service, me, 3, 60.0, checkpoints=tmp_path / "checkpoints") for me in range(3)]
    connectors = [threading.Thread(target=d._connect, args=("127.0.0.1:1",), daemon=True) for d in dogs]
    for c in connectors:
        c.start()
    for c in connectors:
        c.join(timeout=30)
    assert all(d.links is not None and len(d.links.open_peers) == 2 for d in dogs)
    dogs[2].__exit__(None, None, None)  # in order: "done" on its links
    time.sleep(0.5)
    assert dogs[0].lost is None and dogs[1].lost is None, "a process that left in order was called lost"
    started = time.monotonic()
    dogs[1]._stop.set()
    dogs[1]._thread.join()
    dogs[1].links.close()  # process 1 is gone without a word
    dogs[0]._thread.join(timeout=10)
    assert time.monotonic() - started < 1.0
    assert dogs[0].lost == "lost process 1 of 3: it ended (its link to process 0 closed)"
    assert dogs[0].exits == [EXIT_PEER_LOST]
    advice = f"the newest complete checkpoint is step 6 ({tmp_path / 'checkpoints' / '6'}): restart every process"
    assert f"error: lost process 1 of 3: it ended (its link to process 0 closed); process 0 stops too. {advice}" in (
        capsys.readouterr().err
    )


def test_a_run_dir_the_supervisor_cannot_log_into_is_a_run_dir_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(RunDirError, match=f"the runtime's log {blocker}/logs/process-0.log cannot be written"):
        supervise.supervise(blocker / "logs" / "process-0.log", lambda: "")


# What the runtime aborts with (jax 0.10.2, gloo), as its log holds it: process 0 lost, then process 1 lost.
LEADER_LOST = """E1207 17:49:33.285854   13583 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1207 17:49:33.285861   13583 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues. Check earlier logs from 1) this task, 2) the leader (usually slice 0 task 0), and 3) cluster scheduler to debug further.
*** Check failure stack trace: ***
"""
TASK_LOST = """F1207 17:51:56.377800   16209 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.
"""


def test_the_supervisor_turns_the_runtimes_abort_into_one_line_and_status_4(tmp_path, capsys):
    log = tmp_path / "process-1.log"
    advice = lambda: "the newest complete checkpoint is step 6"
    assert supervise.runtime_verdict(LEADER_LOST) == "lost process 0, which runs the coordination service"
    assert supervise.runtime_verdict(TASK_LOST) == "lost process 1: the coordination service had no heartbeat from it"
    assert supervise.outcome(-signal.SIGABRT, LEADER_LOST, log, advice) == EXIT_PEER_LOST
    assert capsys.readouterr().err == (
        "error: lost process 0, which runs the coordination service; the runtime stopped this process. "
        f"the newest complete checkpoint is step 6 (the runtime's log: {log})\n"
    )
    said = f"{supervise.VERDICT_MARK}error: lost process 1 of 2 ...\n{TASK_LOST}"  # the watchdog spoke first
    assert supervise.outcome(-signal.SIGABRT, said, log, advice) == EXIT_PEER_LOST
    assert capsys.readouterr().err == ""
    for code in (0, 2, 3, -signal.SIGKILL, -signal.SIGABRT):  # passed on as they are without the runtime's verdict
        assert supervise.outcome(code, "" if code == -signal.SIGABRT else LEADER_LOST, log, advice) == code


# --------------------------------------------------------------------------- two processes at work


def losses_by_step(run_dir: pathlib.Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in procs.train_rows(run_dir)}


def pid_of(proc: procs.Proc, index: int) -> int:
    return next(int(line.split()[-1]) for _, line in proc.lines if line.startswith(f"[launch] process {index}: pid"))


def kill_and_check_the_survivor(proc: procs.Proc, victim: int, run_dir: pathlib.Path, lost: str) -> None:
    """SIGKILLs process ``victim``: the other must exit 4 within ``PROMPT`` s with one line, ``error: `` +
    ``lost`` + the newest complete checkpoint to resume from, and the runtime must say nothing on the terminal
    (it writes to ``run_dir/logs/process-I.log``)."""
    killed = time.monotonic()
    os.kill(pid_of(proc, victim), signal.SIGKILL)
    assert proc.wait(timeout=120) == 128 + signal.SIGKILL, proc.output[-4000:]
    survivor = 1 - victim
    ended = proc.line_time(f"[launch] process {survivor} ended:")
    assert ended is not None, proc.output[-4000:]
    print(f"process {victim} killed: process {survivor} ended {ended - killed:.2f} s later (timeout {PEER_TIMEOUT} s)")
    assert ended - killed <= PROMPT, f"the survivor took {ended - killed:.1f} s"
    assert f"[launch] process {survivor} ended: exit status {EXIT_PEER_LOST} (lost a peer process)" in proc.output
    assert f"[launch] failed: process {victim} was the first to fail (killed by SIGKILL)" in proc.output
    newest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    resume = f"the newest complete checkpoint is step {newest} ({run_dir / 'checkpoints' / str(newest)})"
    said = [line for t, line in proc.lines if t >= killed and line.startswith(f"[p{survivor}] ")]
    said = [line for line in said if not re.match(r"\[p0\] step \d+/", line)]  # a step logged as the kill came
    assert len(said) == 1 and said[0].startswith(f"[p{survivor}] error: {lost}") and resume in said[0], said
    assert not [line for line in proc.output.splitlines() if RUNTIME_NOISE.match(line)], proc.output[-4000:]
    assert "[Gloo] Rank" in (run_dir / "logs" / f"process-{survivor}.log").read_text()


def test_two_processes_match_one_cross_restore_and_survive_a_lost_peer(tmp_path, compile_cache):
    """1 process x 4 devices writes step 3. 2 processes x 4 devices resume it, save every 3
    steps and lose process 1 to SIGKILL: process 0 must name it, and the checkpoint to resume
    from, and exit 4 at once, well within the peer timeout (60 s). 1 process x 4 devices resumes
    their newest checkpoint. Reference: the step-3 checkpoint resumed in this process on 8
    devices, the launched mesh's shape."""
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
    kill_and_check_the_survivor(proc, 1, run_dir, "lost process 1 of 2: it ended (its link to process 0 closed)")
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
    """Process 0 hosts the coordination service: the runtime aborts the others as it goes (SIGABRT, a C++
    stack trace), and the supervisor turns that into the project's line and status 4, or the watchdog
    says it first."""
    run_dir = tmp_path / "run"
    cfg = mp_config(run_dir, checkpoint={"every": 3, "keep": 3}, faults={"peer_timeout_s": PEER_TIMEOUT})
    proc = launch_train(procs.write_config(cfg, tmp_path / "cfg.yaml"), compile_cache)
    saved = run_dir / "checkpoints" / "3"
    procs.wait_until(lambda: saved.is_dir() and procs.last_logged_step(run_dir) >= 4, 300, proc, "step 4 saved at 3")
    kill_and_check_the_survivor(proc, 0, run_dir, "lost process 0")


def test_diloco_across_two_processes_matches_one_and_resumes_mid_period(tmp_path, compile_cache):
    """DiLoCo (H = 4) over ``data``, which crosses the two processes: the inner steps, the outer
    all-reduce between them and a save mid-period (step 6), launched. Reference: the same run in this
    process on 8 devices, the launched mesh's shape; then step 6's checkpoint, written by two
    processes, resumed here: steps 7..10 continue the reference."""
    steps, every = 10, 4
    outer = {"algorithm": "diloco", "inner_steps": every}
    cfg = functools.partial(mp_config, steps=steps, outer=outer, checkpoint={"every": 6, "keep": 3})
    eight = setup_training(cfg(tmp_path / "reference"), mesh_of(data=4, model=2))  # compiled once, for both runs here
    reference = train(cfg(tmp_path / "reference"), eight.mesh, setup=eight, **quiet)
    expected = dict(enumerate(reference.losses, start=1))

    run_dir = tmp_path / "two"
    proc = launch_train(procs.write_config(cfg(run_dir), tmp_path / "two.yaml"), compile_cache)
    assert proc.wait(timeout=300) == 0, proc.output[-4000:]
    assert not [line for line in proc.output.splitlines() if RUNTIME_NOISE.match(line)], proc.output[-4000:]
    launched = losses_by_step(run_dir)
    assert sorted(launched) == list(range(1, steps + 1))
    worst = max(abs(loss - expected[step]) for step, loss in launched.items())
    assert worst <= SAME_SHAPE, f"DiLoCo on 2 x 4 devices differs from 1 x 8 by {worst:.2e}"

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "6", resumed_dir / "checkpoints" / "6")
    resumed = train(cfg(resumed_dir), eight.mesh, setup=eight, **quiet)
    assert resumed.start_step == 6
    worst = max(abs(loss - expected[step]) for step, loss in enumerate(resumed.losses, start=7))
    assert worst <= SAME_SHAPE, f"resumed from the two processes' mid-period save, the losses differ by {worst:.2e}"
