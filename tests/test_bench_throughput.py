"""bench/throughput.py runs on the CPU and writes every figure a GPU run is compared by."""

from __future__ import annotations

import json
import sys

from tests.procs import REPO

# One layer, and the README as the corpus: the figures' plumbing, not the stdlib corpus's read time.
SMALL = ["model.n_layers=1", "batch_size=8", "seq_len=32", "data.source=text", f"data.paths=[{REPO / 'README.md'}]"]


def test_throughput_bench_writes_comparable_json(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import throughput

    out = tmp_path / "tp.json"
    argv = ["--config", "configs/tiny.yaml", "--mesh", "meshes/cpu-8.yaml", "--steps", "2", "--warmup", "1"]
    assert throughput.main([*argv, "--json", str(out), "--hlo", str(tmp_path / "hlo"), *SMALL]) == 0
    r = json.loads(out.read_text())
    assert r["devices"] == 8 and r["jax"] and r["tokens_per_step"] == 8 * 32
    for key in ("compile_s", "step_ms", "synced_step_ms", "host_ms", "batch_ms", "dispatch_ms", "tokens_per_s"):
        assert r[key] > 0, key
    assert r["mfu"] is None  # no peak for a CPU
    assert r["flops_per_token"] > 0 and "train_step" in "".join(p.name for p in (tmp_path / "hlo").iterdir())
    assert "tokens/s" in capsys.readouterr().out
