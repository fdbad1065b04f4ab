"""The command lines a user runs: train.py and python -m shardlib.analysis.describe, as subprocesses."""

import json
import os
import subprocess
import sys

import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# The commands run as a user runs them: without the compile-time flags of tests/conftest.py, which
# make XLA:CPU compile faster but run slower (measured: the default run below takes 33 CPU-s
# without them, 66 CPU-s with them: 1.0 s against 3.0 s a step).
USER_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=USER_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_default_training_run(tmp_path):
    """The README's main command, shortened: it exits 0, its loss falls, it leaves its artefacts."""
    proc = run(
        "train.py",
        "--config",
        "configs/tiny.yaml",
        "--mesh",
        "meshes/cpu-8.yaml",
        "steps=20",
        f"run_dir={tmp_path}",
        "log_every=5",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 4
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    assert any(r["split"] == "eval" for r in records)
    assert all("tokens_per_s" in r for r in records if r["split"] == "train" and r["step"] > 5)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "20").is_dir()
    assert any((tmp_path / "tb").iterdir())
    assert "data=4 x model=2" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["stpes=5"], "unknown config key 'stpes'; did you mean: steps"),
        (["steps=many"], "steps"),
        (["--mesh", "meshes/nope.yaml"], "nope.yaml"),
        (["--mesh", "meshes/cpu-4.yaml", "--devices", "8"], "needs 4 devices (data=2 x model=2) but 8 cpu devices"),
        (["batch_size=30"], "batch_size=30"),
        (["model.n_heads=3"], "n_heads"),
    ],
)
def test_user_errors_are_one_line_not_a_traceback(tmp_path, args, message):
    proc = run("train.py", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_describe_command():
    proc = run(
        "-m",
        "shardlib.analysis.describe",
        "--config",
        "configs/tiny.yaml",
        "--mesh",
        "meshes/cpu-8-fsdp.yaml",
        "--sharding",
        "fsdp",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layers/q" in proc.stdout and "P(None, 'data', None, None)" in proc.stdout
    assert "replicated: 0.0% of parameter bytes" in proc.stdout


def test_describe_warns_about_an_idle_mesh_axis():
    proc = run("-m", "shardlib.analysis.describe", "--config", "configs/tiny.yaml", "--sharding", "dp", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: mesh axis 'model' (size 2) shards neither parameters nor the batch" in proc.stdout
