"""The run guard: a run directory resumes only the run it holds; --restart starts over elsewhere."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from shardlib.training import run_guard
from shardlib.training.cli import train_main
from shardlib.training.config import config_to_dict
from shardlib.training.run_guard import (
    RunMismatch,
    check_resume,
    differences,
    fingerprint,
    record_start,
    restart_run_dir,
)
from shardlib.training.trainer import train
from tests import procs
from tests.support import mesh_of, tiny_config

MESH_FILE = "meshes/cpu-8.yaml"  # data 4 x model 2, as mesh_of(data=4, model=2)
quiet = {"progress": False, "log": lambda _: None}


def guard_config(run_dir, **overrides):
    return tiny_config(run_dir, **({"steps": 2, "checkpoint": {"every": 1, "keep": 1}} | overrides))


def changed_keys(**overrides) -> list[str]:
    run_dir = overrides.pop("run_dir", "a")
    old, new = (fingerprint(config_to_dict(c)) for c in (guard_config("a"), guard_config(run_dir, **overrides)))
    return [key for key, _, _ in differences(old, new)]


def everything(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> pathlib.Path:
    """A finished 2-step run, a checkpoint at each step, keeping 1."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    train(guard_config(run_dir), mesh_of(data=4, model=2), **quiet)
    return run_dir


def copy_of(first_run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(first_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps": 500, "log_every": 7, "eval_every": 3, "eval_batches": 2},
        {"checkpoint": {"every": 50, "keep": 9, "async_save": False, "fallback": True}},
        {"faults": {"nan_policy": "skip", "peer_timeout_s": 5}, "peak_tflops": 100.0, "run_dir": "elsewhere"},
        {"optimizer": {"lr": 1e-4}, "grad_accum": 2},  # the advice after a divergence: a lower lr
        {"sharding": "fsdp", "mesh": "meshes/cpu-4.yaml"},  # checkpoints restore onto another layout
    ],
)
def test_what_may_change_when_resuming(overrides):
    assert changed_keys(**overrides) == []


@pytest.mark.parametrize(
    "overrides, keys",
    [
        ({"model": {"d_model": 64}}, ["model.d_model"]),
        ({"model": {"param_dtype": "bfloat16", "n_layers": 4}}, ["model.n_layers", "model.param_dtype"]),
        ({"seed": 1, "batch_size": 8, "seq_len": 32}, ["batch_size", "seed", "seq_len"]),
        ({"data": {"heldout_fraction": 0.1}}, ["data.heldout_fraction"]),
        ({"grad_compression": "int8"}, ["grad_compression"]),
    ],
)
def test_what_defines_the_run(overrides, keys):
    assert changed_keys(**overrides) == keys


def test_history_is_appended_and_a_directory_from_before_it_still_guards(tmp_path):
    assert run_guard.recorded_fingerprint(tmp_path) is None
    legacy = guard_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(legacy)))  # written before the history
    with pytest.raises(RunMismatch, match=r"\(seed 0 -> 3\)"):
        check_resume(tmp_path, guard_config(tmp_path, seed=3))

    record_start(tmp_path, legacy, 0)
    record_start(tmp_path, guard_config(tmp_path, steps=9), 2)
    with open(tmp_path / "config-history.jsonl", "a") as f:
        f.write('{"started_at": "2026-')  # a line cut short by a kill
    entries = [json.loads(line) for line in (tmp_path / "config-history.jsonl").read_text().splitlines()[:2]]
    assert [(e["start_step"], e["config"]["steps"]) for e in entries] == [(0, 2), (2, 9)]
    assert entries[0]["fingerprint_digest"] == entries[1]["fingerprint_digest"]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 9, "config.json is the latest config"
    check_resume(tmp_path, guard_config(tmp_path, steps=20))


@pytest.mark.parametrize(
    "overrides, listed",
    [
        ({"seed": 1}, "seed 0 -> 1"),  # would resume and overwrite silently
        ({"seed": 1, "model": {"d_model": 64}}, "model.d_model 32 -> 64, seed 0 -> 1"),  # would fail to restore
    ],
)
def test_another_run_in_the_directory_is_one_error_line_and_touches_nothing(
    tmp_path, first_run, capsys, overrides, listed
):
    """keep=1: a start that resumed and saved would prune the old run's only checkpoint."""
    run_dir = copy_of(first_run, tmp_path)
    before = everything(run_dir)
    config = procs.write_config(guard_config(run_dir, steps=4, **overrides), tmp_path / "other.yaml")
    assert train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"error: run_dir {run_dir} holds a run of another config ({listed})" in line, line
    assert "--restart" in line and "Traceback" not in err
    assert everything(run_dir) == before, "a refused start changed the run directory"


def test_more_steps_and_other_intervals_resume(tmp_path, first_run):
    run_dir = copy_of(first_run, tmp_path)
    cfg = guard_config(run_dir, steps=3, log_every=2, checkpoint={"every": 3, "keep": 2}, faults={"nan_policy": "skip"})
    result = train(cfg, mesh_of(data=4, model=2), **quiet)
    assert (result.start_step, result.final_step) == (2, 3)
    entries = [json.loads(line) for line in (run_dir / "config-history.jsonl").read_text().splitlines()]
    assert [(e["start_step"], e["config"]["steps"]) for e in entries] == [(0, 2), (2, 3)]


def test_restart_starts_over_in_a_new_directory(tmp_path, first_run, capsys):
    run_dir = copy_of(first_run, tmp_path)
    before = everything(run_dir)
    config = procs.write_config(guard_config(run_dir, seed=1), tmp_path / "seed1.yaml")
    assert train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress", "--restart"]) == 0
    fresh = tmp_path / "run-2"
    assert f"--restart: starting over in {fresh} ({run_dir} is left as it is)" in capsys.readouterr().out
    assert everything(run_dir) == before
    assert (fresh / "checkpoints" / "2").is_dir()
    assert run_guard.recorded_fingerprint(fresh)["seed"] == 1


def test_restart_numbers_new_directories(tmp_path):
    run_dir = tmp_path / "run"
    assert restart_run_dir(run_dir) == run_dir  # absent: nothing to start over from
    run_dir.mkdir()
    assert restart_run_dir(run_dir) == run_dir  # empty
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert restart_run_dir(run_dir) == tmp_path / "run-2"
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "config.json").write_text("{}")
    assert restart_run_dir(run_dir) == tmp_path / "run-3"
