"""bench/throughput.py runs on the CPU and writes every figure a GPU run is compared by, its step profile too."""

from __future__ import annotations

import json
import sys

import pytest

from shardlib.analysis import step_profile
from tests.procs import REPO

# One layer, and the README as the corpus: the figures' plumbing, not the stdlib corpus's read time.
SMALL = ["model.n_layers=1", "batch_size=8", "seq_len=32", "data.source=text", f"data.paths=[{REPO / 'README.md'}]"]


def test_throughput_bench_writes_comparable_json(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import throughput

    out, trace = tmp_path / "tp.json", tmp_path / "trace"
    argv = ["--config", "configs/tiny.yaml", "--mesh", "meshes/cpu-8.yaml", "--steps", "2", "--warmup", "1"]
    argv += ["--trace", str(trace), "--trace-steps", "3"]
    assert throughput.main([*argv, "--json", str(out), "--hlo", str(tmp_path / "hlo"), *SMALL]) == 0
    r = json.loads(out.read_text())
    assert r["devices"] == 8 and r["jax"] and r["tokens_per_step"] == 8 * 32
    for key in ("compile_s", "step_ms", "synced_step_ms", "host_ms", "batch_ms", "dispatch_ms", "tokens_per_s"):
        assert r[key] > 0, key
    assert r["mfu"] is None  # no peak for a CPU
    assert r["flops_per_token"] > 0 and "train_step" in "".join(p.name for p in (tmp_path / "hlo").iterdir())
    printed = capsys.readouterr().out
    assert "tokens/s" in printed

    # The untimed traced steps, broken down: on the CPU, the host threads' ops of device 0.
    profile = r["profile"]
    assert profile["steps"] == 3 and profile["source"] == "host:CPU device 0"
    assert sum(profile["percent"].values()) == pytest.approx(100)
    assert sum(profile["exclusive_ms"].values()) == pytest.approx(profile["window_ms"])
    # The compiled module names XLA:CPU's dot fusions, so the matmuls are found as matmuls.
    assert profile["exclusive_ms"]["matmul"] > 0 and profile["exclusive_ms"]["collective"] > 0
    top_ms = [ms for _, _, ms, _ in profile["top_ops"]]
    assert top_ms and top_ms == sorted(top_ms, reverse=True)
    assert "step profile (host:CPU device 0, 3 steps)" in printed

    # The same trace read off-line, as one fetched from a GPU machine would be.
    assert step_profile.main([str(trace), "--steps", "3", "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["window_ms"] == pytest.approx(profile["window_ms"])
