"""The command lines a user runs: train.py and python -m shardlib.analysis.describe, as subprocesses."""

import functools
import json
import os
import subprocess
import sys

import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# The commands run as a user runs them: without the compile-time flags of tests/conftest.py, which
# make XLA:CPU compile faster but run slower (measured on its former 20 steps: the default run below took 33 CPU-s
# without them, 66 CPU-s with them: 1.0 s against 3.0 s a step).
USER_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=USER_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_default_training_run(tmp_path):
    """The README's main command, shortened: it exits 0, its loss falls, it leaves its artefacts.

    12 steps logged every 3: the warmup (30 steps) is longer than the run, so these are the first 12
    steps of any longer run, and the loss falls by about 1 over them (5.4 at step 3, 4.3 at step 12); step 1
    is logged too (the initial loss)."""
    proc = run(
        "train.py",
        "--config",
        "configs/tiny.yaml",
        "--mesh",
        "meshes/cpu-8.yaml",
        "steps=12",
        f"run_dir={tmp_path}",
        "log_every=3",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 3, 6, 9, 12]  # step 1: the initial loss
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    assert any(r["split"] == "eval" for r in records)
    assert all("tokens_per_s" in r for r in records if r["split"] == "train" and r["step"] > 3)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "12").is_dir()
    assert any((tmp_path / "tb").iterdir())
    assert "data=4 x model=2" in proc.stdout
    assert proc.stdout.splitlines()[-1] == (
        f"outputs in {tmp_path}: metrics.jsonl, tb/ (TensorBoard), loss.png, config.json, checkpoints/12"
    )


# The short commands below (each ends before anything compiles) run in one process, one after the
# other, each as ``python train.py ARGS`` or ``python -m shardlib.analysis.describe ARGS`` would run
# it: its exit status (sys.exit of the entry point's return value, or argparse's exit), its stdout
# and its stderr, where an exception that escapes the entry point leaves its traceback, as Python
# would. One interpreter start and one import of JAX instead of one for each command: every command
# here uses the 8 CPU devices of the config's mesh, so none depends on which ran before it.
_DRIVER = """
import contextlib, io, json, sys, traceback
sys.path.insert(0, ".")
from shardlib.analysis.describe import main as describe_main
from shardlib.training.cli import train_main
entry = {"train.py": train_main, "shardlib.analysis.describe": describe_main}
results = []
for program, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry[program](argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""

USER_ERRORS = [
    (["stpes=5"], "unknown config key 'stpes'; did you mean: steps"),
    (["steps=many"], "steps"),
    (["--mesh", "meshes/nope.yaml"], "nope.yaml"),
    (["--mesh", "meshes/cpu-4.yaml", "--devices", "8"], "needs 4 devices (data=2 x model=2) but 8 cpu devices"),
    (["batch_size=30"], "batch_size=30"),
    (["model.n_heads=3"], "n_heads"),
    # A word for two settings, and a leaf name in a section the run never reads (tiny runs without DiLoCo).
    (
        ["learning_rate=1e-3"],
        "ambiguous config key 'learning_rate'; use the full name: optimizer.lr, outer.learning_rate",
    ),
    (["nesterov=false"], "override 'nesterov=false' sets outer.nesterov, which this run never reads"),
]
DESCRIBE_FSDP = ["--config", "configs/tiny.yaml", "--mesh", "meshes/cpu-8-fsdp.yaml", "--sharding", "fsdp"]
DESCRIBE_DP = ["--config", "configs/tiny.yaml", "--sharding", "dp"]


@functools.cache
def short_commands(run_dir: str) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """(program, *argv) -> its exit status and output, for every short command of this module."""
    commands = [("train.py", ["--config", "configs/tiny.yaml", f"run_dir={run_dir}", *args]) for args, _ in USER_ERRORS]
    commands += [("shardlib.analysis.describe", argv) for argv in (DESCRIBE_FSDP, DESCRIBE_DP)]
    proc = run("-c", _DRIVER, json.dumps(commands), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What reached the process's own stderr, below Python (absl, XLA), holds no traceback either.
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    return {
        (program, *argv): subprocess.CompletedProcess([program, *argv], **result)
        for (program, argv), result in zip(commands, results, strict=True)
    }


@pytest.fixture(scope="module")
def short_run_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("short-commands") / "run")


@pytest.mark.parametrize("args, message", USER_ERRORS)
def test_user_errors_are_one_line_not_a_traceback(short_run_dir, args, message):
    proc = short_commands(short_run_dir)[
        ("train.py", "--config", "configs/tiny.yaml", f"run_dir={short_run_dir}", *args)
    ]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_describe_command(short_run_dir):
    proc = short_commands(short_run_dir)[("shardlib.analysis.describe", *DESCRIBE_FSDP)]
    assert proc.returncode == 0, proc.stderr
    assert "layers/qkv" in proc.stdout and "P(None, 'data', None, None, None)" in proc.stdout
    assert "replicated: 0.0% of parameter bytes" in proc.stdout


def test_describe_warns_about_an_idle_mesh_axis(short_run_dir):
    proc = short_commands(short_run_dir)[("shardlib.analysis.describe", *DESCRIBE_DP)]
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: mesh axis 'model' (size 2) shards neither parameters nor the batch" in proc.stdout
