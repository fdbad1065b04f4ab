"""The GPU session's tools work before a GPU is lent: every case of bench/gpu_throughput.sh is a valid
run on one device, the side-by-side table and the loss comparison read what the runs write."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from shardlib.core.mesh import build_mesh, load_mesh_spec
from shardlib.training.config import load_config
from shardlib.training.parallel_plan import build_plan
from tests.procs import REPO

sys.path.insert(0, str(REPO / "bench"))
import compare_losses
import throughput_table


def _cases() -> list[tuple[str, str, list[str]]]:
    """(name, config path, overrides) of every case the script runs."""
    listed = subprocess.run(
        ["bash", "bench/gpu_throughput.sh"],
        cwd=REPO,
        env={**os.environ, "LIST_CASES": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = []
    for line in listed.splitlines():
        options, name, overrides, _flags = line.split("|")
        words = options.split()
        out.append((name, words[words.index("--config") + 1], overrides.split()))
    return out


def test_every_case_of_the_gpu_script_is_a_valid_one_device_run():
    """A typo in a case would cost device time: each case's config validates and plans on one device."""
    cases = _cases()
    assert len(cases) >= 10 and "base" in [name for name, _, _ in cases]
    one = build_mesh(load_mesh_spec(REPO / "meshes/gpu-1.yaml"), jax.devices()[:1])
    for name, config, overrides in cases:
        cfg = load_config(REPO / config, overrides)
        assert build_plan(cfg, one).batch_sharding is not None, name


def _result(path, tokens_per_s, **extra):
    figures = {"device": "NVIDIA H200", "devices": 1, "jax": "0.11.2", "peak_tflops": 989.0}
    figures |= {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s / 1e6, "step_ms": 1.0, "host_ms": 0.1}
    figures |= {"compile_s": 30.0, "memory": {"arguments": 2**30, "temporaries": 2**31}} | extra
    path.write_text(json.dumps(figures))
    return path


def test_the_table_sets_each_run_against_the_first(tmp_path):
    base = _result(tmp_path / "base.json", 200_000.0)
    profile = {"percent": {"matmul": 40.0, "elementwise": 35.0, "idle": 25.0}}
    fast = _result(tmp_path / "fast.json", 450_000.0, profile=profile)
    text = throughput_table.table([base, fast])
    assert text.splitlines()[0] == "NVIDIA H200 x 1, jax 0.11.2, peak 989.0 TFLOPS"
    base_row, fast_row = text.splitlines()[2].split(), text.splitlines()[3].split()
    assert base_row[:4] == ["base", "200,000", "1.000", "20.0%"] and base_row[7] == "3.0"  # GiB: 1 + 2
    assert fast_row[:3] == ["fast", "450,000", "2.250"] and fast_row[8:] == ["40", "-", "35", "-", "-", "25"]
    markdown = throughput_table.table([base, fast], markdown=True).splitlines()
    assert markdown[2].startswith("| run | tokens/s |") and markdown[4].startswith("| base |")
    assert throughput_table.main([str(base), str(tmp_path / "missing.json")]) == 2


def _metrics(path, losses):
    path.write_text("".join(json.dumps({"step": s, "split": "train", "loss": x}) + "\n" for s, x in losses))
    return str(path)


def test_losses_are_compared_step_by_step_relative_to_the_reference(tmp_path, capsys):
    steps = np.arange(1, 101)
    reference = _metrics(tmp_path / "a.jsonl", zip(steps.tolist(), (10.0 / steps).tolist(), strict=True))
    close = _metrics(tmp_path / "b.jsonl", zip(steps.tolist(), (10.0 / steps * 1.004).tolist(), strict=True))
    drifted = [(s, 10.0 / s * (1.03 if s == 60 else 1.0)) for s in steps.tolist()]
    far = _metrics(tmp_path / "c.jsonl", drifted)
    assert compare_losses.main([reference, close]) == 0
    assert "largest relative difference 4.00e-03" in capsys.readouterr().out
    assert compare_losses.main([reference, far]) == 1
    assert "3.00e-02 at step 60" in capsys.readouterr().out
    assert compare_losses.main([reference, _metrics(tmp_path / "d.jsonl", [])]) == 2


@pytest.mark.parametrize("script", ["bench/gpu_throughput.sh", "bench/gpu_checks.sh", "bench/gpu_env.sh"])
def test_the_gpu_scripts_parse(script):
    subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
