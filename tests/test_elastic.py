"""Elastic runs: the mesh and grad_accum a process count derives, the launcher's restarts, and a real run.

The real run (``test_an_elastic_run_survives_kills_grows_back_and_matches_an_uninterrupted_one``)
is 4 local processes x 2 emulated CPU devices on ``meshes/cpu-4x2.yaml`` (data 4 across the
processes x model 2), one job through four generations: a kill mid-step shrinks it to 3
processes (data 3, grad_accum 3 -> 4), a rejoin grows it back to 4 at a checkpoint, a kill of
process 0 mid-save shrinks it again, and it finishes. The launcher-logic tests run stand-in
processes without JAX.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re
import signal
import sys
import threading
import time

import pytest

from shardlib.cluster import launch
from shardlib.cluster.elastic import (
    data_parallel_size,
    derive_elastic_mesh,
    elastic_grad_accum,
    elastic_requested,
    resize_for_processes,
)
from shardlib.cluster.elastic_launch import REJOIN_SIGNAL, ElasticLauncher, Timeline
from shardlib.core.mesh import load_mesh_spec, mesh_spec_from_dict
from shardlib.core.rules import ShardingError
from shardlib.training.metrics import loss_by_step, read_metrics
from shardlib.training.run_check import check_run
from shardlib.training.trainer import setup_training, train
from tests import procs
from tests.support import mesh_of, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH = REPO / "meshes" / "cpu-4x2.yaml"


def spec(within: dict, across: dict, name: str = "m"):
    return mesh_spec_from_dict({"within_host": within, "across_hosts": across}, name)


# --------------------------------------------------------------------------- the derived mesh


def test_the_data_axis_across_hosts_takes_the_processes_there_are():
    full = load_mesh_spec(MESH)
    three = derive_elastic_mesh(full, 3)
    assert three.across_hosts["data"] == 3 and three.within_host == full.within_host
    assert {a: s for a, s in three.across_hosts.items() if a != "data"} == {
        a: s for a, s in full.across_hosts.items() if a != "data"
    }
    assert derive_elastic_mesh(full, 4) is full
    assert "data across hosts 4 -> 3 for 3 processes (elastic)" in three.description
    # data_replica takes the change when it crosses hosts; model across hosts stays.
    hsdp = spec({"data": 2}, {"data_replica": 4, "model": 2})
    six = derive_elastic_mesh(hsdp, 6)
    assert (six.across_hosts["data_replica"], six.across_hosts["data"], six.across_hosts["model"]) == (3, 1, 2)
    assert (data_parallel_size(hsdp), data_parallel_size(six)) == (8, 6)


@pytest.mark.parametrize(
    "within, across, processes, message",
    [
        ({"data": 4}, {"model": 2}, 1, r"neither data nor data_replica crosses hosts \(across_hosts model=2\)"),
        ({"data": 2}, {"data": 2, "model": 2}, 3, r"the axes across hosts that stay \(model=2\) need a multiple of 2"),
        ({"data": 2}, {"data": -1}, 3, r"needs every across_hosts size stated .* data is -1"),
    ],
)
def test_a_mesh_that_cannot_change_is_refused_by_name(within, across, processes, message):
    with pytest.raises(ValueError, match=message):
        derive_elastic_mesh(spec(within, across), processes)


def test_grad_accum_keeps_the_global_batch_or_says_what_would():
    full = load_mesh_spec(MESH)
    assert elastic_grad_accum(3, full, derive_elastic_mesh(full, 3)) == 4
    assert elastic_grad_accum(1, full, derive_elastic_mesh(full, 2)) == 2
    assert elastic_grad_accum(4, derive_elastic_mesh(full, 2), full) == 2  # and back
    with pytest.raises(ValueError, match=r"grad_accum=1 .* 1 x 4 / 3, not an integer; choose a grad_accum that is a "):
        elastic_grad_accum(1, full, derive_elastic_mesh(full, 3))


def test_a_config_resizes_with_its_mesh_and_diloco_is_refused(tmp_path):
    full = load_mesh_spec(MESH)
    cfg = tiny_config(tmp_path, batch_size=12, grad_accum=3)
    resized, three, line = resize_for_processes(cfg, full, 3)
    assert (resized.grad_accum, resized.batch_size, three.across_hosts["data"]) == (4, 12, 3)
    assert line == "elastic: 3 processes, data across hosts 4 -> 3, grad_accum 3 -> 4 (global batch 12 unchanged)"
    assert resize_for_processes(cfg, full, 4) == (cfg, full, None)
    diloco = tiny_config(tmp_path, batch_size=12, grad_accum=3, outer={"algorithm": "diloco", "inner_steps": 2})
    with pytest.raises(ValueError, match="elastic DiLoCo is not supported yet"):
        resize_for_processes(diloco, full, 3)
    assert elastic_requested(False, {"SHARDLIB_ELASTIC": "1"}) and not elastic_requested(False, {})


def test_a_model_dimension_the_smaller_data_axis_does_not_divide_is_named(tmp_path):
    """fsdp shards ``embed`` (32) over data: on 3 processes the rules name the dimension and data=3."""
    fsdp = tiny_config(tmp_path, batch_size=12, grad_accum=3, sharding="fsdp")
    resized, _, _ = resize_for_processes(fsdp, load_mesh_spec(MESH), 3)
    with pytest.raises(ShardingError, match=r"'embed'\) of shape \(256, 32\) .* does not divide by mesh axes data=3"):
        setup_training(resized, mesh_of(data=3, model=2))


# --------------------------------------------------------------------------- the launcher, with stand-ins

# A stand-in for train.py: what it does depends on the processes of its generation (and a marker file).
STAND_IN = """
import os, signal, sys, time, pathlib
me, count = int(os.environ["JAX_PROCESS_ID"]), int(os.environ["JAX_NUM_PROCESSES"])
assert os.environ["SHARDLIB_ELASTIC"] == "1"
marker = pathlib.Path(sys.argv[1])
if count == 3 and not marker.exists():  # the first generation: process 1 dies, the others notice
    time.sleep(0.3)
    if me == 1:
        marker.write_text("")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    if me == 2 and sys.argv[2] == "fails":
        sys.exit(2)
    print("error: lost process 1 of 3: it ended", flush=True)
    sys.exit(4)
if me == 0:
    print("resumed from ckpt/3", flush=True)
    print(f"step {count}/9 | loss 1.0", flush=True)
if count == 2:  # wait for the launcher's SIGTERM (the rejoin), then stop in order
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(30)
    sys.exit(5)
"""


def stand_in_launcher(tmp_path, min_processes: int, behaviour: str = "dies") -> ElasticLauncher:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    command = [sys.executable, str(script), str(tmp_path / "marker"), behaviour]
    return ElasticLauncher(command, 3, min_processes, grace_s=10)


def test_the_launcher_restarts_on_the_survivors_and_grows_back_on_rejoin(tmp_path, capsys):
    launcher = stand_in_launcher(tmp_path, min_processes=2)

    def rejoin_once_two_run():
        deadline = time.monotonic() + 60
        while not (launcher.available == 2 and launcher._stepped) and time.monotonic() < deadline:
            time.sleep(0.01)
        launcher.on_signal(REJOIN_SIGNAL, None)

    threading.Thread(target=rejoin_once_two_run, daemon=True).start()
    assert launcher.run() == 0
    out = capsys.readouterr().out
    assert "[launch +" in out and "elastic: lost process(es) 1 of 3; restarting on 2" in out, out
    assert "rejoin signal: asking the 2 processes to save a checkpoint and stop, to grow" in out, out
    assert "elastic: every process stopped; restarting on all 3" in out, out
    assert [t.cause for t in launcher.timelines] == ["the loss of process 1", "growing back to 3 processes"]
    lost = launcher.timelines[0]
    assert lost.start < lost.noticed < lost.stopped < lost.restarted < lost.restored <= lost.resumed
    assert "elastic timeline of the loss of process 1, seconds after it: survivors named it +0." in out


def test_fewer_than_min_processes_ends_the_job_with_the_first_failure(tmp_path, capsys):
    assert stand_in_launcher(tmp_path, min_processes=3).run() == 128 + signal.SIGKILL
    out = capsys.readouterr().out
    assert "elastic: 2 of 3 processes left, fewer than --min-processes 3: not restarting" in out, out


def test_a_failure_a_restart_would_not_mend_is_not_restarted(tmp_path, capsys):
    launcher = stand_in_launcher(tmp_path, min_processes=1, behaviour="fails")
    assert launcher.run() == 128 + signal.SIGKILL
    assert "process 2 failed (exit status 2 (error)), which a restart would not mend: not restarting" in (
        capsys.readouterr().out
    )
    with pytest.raises(ValueError, match=r"--min-processes must lie in 1..3 \(--processes\), got 4"):
        ElasticLauncher(["x.py"], 3, 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--processes", "2", "--min-processes", "1", "--", "x.py"], "--min-processes needs --elastic"),
        (["--elastic", "--processes", "2", "--port", "5", "--", "x.py"], "--port cannot be combined with --elastic"),
        (["--elastic", "--processes", "2", "--min-processes", "3", "--", "x.py"], r"must lie in 1..2"),
    ],
)
def test_the_launchers_elastic_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        launch.main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_a_timeline_reads_in_seconds_after_its_cause():
    timeline = Timeline("the loss of process 2", 10.0, noticed=10.01, stopped=10.5, restarted=10.52)
    assert timeline.line() == (
        "elastic timeline of the loss of process 2, seconds after it: survivors named it +0.01, stopped +0.50, "
        "restarted +0.52"
    )


# --------------------------------------------------------------------------- a real elastic run

STEPS = 12
RELATIVE = 1e-5  # data 3 x grad_accum 4 against data 4 x grad_accum 3: the reduction order changes


def elastic_config(run_dir: pathlib.Path):
    return tiny_config(
        run_dir, steps=STEPS, batch_size=12, grad_accum=3, sharding="tp", checkpoint={"every": 3, "keep": 4}
    )


def pid_of(proc: procs.Proc, index: int) -> int:
    """The pid of process ``index`` of the newest generation."""
    pattern = re.compile(rf"\[launch \+[\d.]+s\] process {index}: pid (\d+)$")
    return int([m.group(1) for _, line in proc.lines if (m := pattern.match(line))][-1])


def generations(proc: procs.Proc) -> int:
    return sum(bool(re.match(r"\[launch \+[\d.]+s\] \d processes, coordinator", line)) for _, line in proc.lines)


def saving(run_dir: pathlib.Path, after: int) -> bool:
    """A save of a step after ``after`` is under way (Orbax's temporary directory)."""
    return any(p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) > after and "tmp" in p.name
               for p in (run_dir / "checkpoints").iterdir())  # fmt: skip


@pytest.mark.slow
def test_an_elastic_run_survives_kills_grows_back_and_matches_an_uninterrupted_one(tmp_path):
    reference = train(elastic_config(tmp_path / "reference"), mesh_of(data=4, model=2), progress=False, log=lambda _: 0)
    expected = dict(enumerate(reference.losses, start=1))

    run_dir = tmp_path / "elastic"
    config = procs.write_config(elastic_config(run_dir), tmp_path / "elastic.yaml")
    args = ["-m", "shardlib.cluster.launch", "--elastic", "--min-processes", "2", "--processes", "4", "--grace", "60"]
    args += ["--", "train.py", "--config", str(config), "--mesh", str(MESH), "--no-progress"]
    proc = procs.Proc(args, procs.env(tmp_path / "compile-cache"))
    wait = functools.partial(procs.wait_until, timeout=300, proc=proc)
    # 1. A kill mid-step: process 2, once step 3 is saved and step 4 logged.
    wait(lambda: (run_dir / "checkpoints" / "3").is_dir() and procs.last_logged_step(run_dir) >= 4, what="step 4")
    os.kill(pid_of(proc, 2), signal.SIGKILL)
    # 2. On 3 processes, once a step is logged: the lost slot is back.
    wait(lambda: generations(proc) == 2 and proc.output.count("elastic timeline") == 1, what="a step on 3")
    proc.popen.send_signal(REJOIN_SIGNAL)
    # 3. On 4 processes again: process 0 (the coordination service's) killed while a later step is saved.
    wait(lambda: generations(proc) == 3 and proc.output.count("elastic timeline") == 2, what="the rejoin")
    grown_from = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    wait(lambda: saving(run_dir, grown_from), what="a save under way")
    os.kill(pid_of(proc, 0), signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, proc.output[-6000:]
    out = proc.output
    for line in out.splitlines():
        if "elastic timeline" in line:
            print(line)  # the figure of the closing note (pytest -s)

    assert out.count("[p0] elastic: 3 processes, data across hosts 4 -> 3, grad_accum 3 -> 4") == 2, out[-6000:]
    assert "[p0] resumed from " in out and "a save that never completed" in out, out[-6000:]
    assert [line.split("] ", 1)[1] for line in out.splitlines() if "elastic: lost" in line] == [
        "elastic: lost process(es) 2 of 4; restarting on 3",
        "elastic: lost process(es) 0 of 4; restarting on 3",
    ]
    records = read_metrics(run_dir / "metrics.jsonl")
    history = dict(zip(*loss_by_step(records, "train"), strict=True))  # a step logged again: the later row wins
    assert sorted(history) == list(range(1, STEPS + 1)), "a step is missing from the final history"
    # Every row, also those of the steps a generation ran before it was stopped and the next ran again.
    logged = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    worst = max(abs(loss - expected[step]) / abs(expected[step]) for step, loss in logged)
    assert worst <= RELATIVE, f"the elastic run's losses differ from the uninterrupted run's by {worst:.2e} relative"
    check = check_run(run_dir, deep=True)
    assert check.steps and all(step.restores == "yes" for step in check.steps), check
    assert check.steps[-1].step == STEPS and not math.isnan(history[STEPS])
