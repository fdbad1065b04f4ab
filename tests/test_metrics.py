"""Tests for shardlib.training.metrics: JSON lines, TensorBoard events, loss plots, peak FLOPS and MFU."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from shardlib.training.metrics import (
    METRICS_FILE,
    TB_DIR,
    MetricsWriter,
    mfu,
    peak_tflops,
    plot_loss_curve,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _event_files(run_dir):
    return sorted((run_dir / TB_DIR).glob("events.out.tfevents.*"))


def test_jsonl_round_trip_converts_scalars_to_plain_numbers(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": np.float32(2.5), "tokens": np.int64(4096), "lr": 1e-3})
        w.write(2, {"loss": jnp.asarray(2.25, dtype=jnp.bfloat16), "grad_norm": jnp.float32(0.5)})
        w.write(2, {"loss": 2.0}, split="eval")

    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 2]
    assert [r["split"] for r in records] == ["train", "train", "eval"]
    assert records[0]["loss"] == 2.5 and type(records[0]["loss"]) is float
    assert records[0]["tokens"] == 4096 and type(records[0]["tokens"]) is int
    assert records[1]["loss"] == 2.25 and records[1]["grad_norm"] == 0.5
    assert all(isinstance(r["time"], float) for r in records)


def test_reopen_appends_to_existing_file(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 3.0})
    with MetricsWriter(tmp_path) as w:
        w.write(2, {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2]


def test_written_records_are_flushed_before_close(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write(1, {"loss": 3.0})
    assert read_metrics(tmp_path / METRICS_FILE)[0]["loss"] == 3.0
    w.close()
    w.close()  # idempotent


def test_non_finite_values_survive_round_trip(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": float("nan"), "grad_norm": np.float32("inf")})
    (record,) = read_metrics(tmp_path / METRICS_FILE)
    assert math.isnan(record["loss"]) and record["grad_norm"] == math.inf


def test_rejects_non_scalars_and_reserved_names(tmp_path):
    with MetricsWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            w.write(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 1.0})


def test_truncated_last_line_is_skipped(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(json.dumps({"step": 1, "split": "train", "loss": 3.0}) + "\n" + '{"step": 2, "spl')
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\n{"step": 2, "spl\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_resume_after_crash_drops_partial_record(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(json.dumps({"step": 1, "split": "train", "loss": 3.0}) + '\n{"step": 2, "lo')
    with MetricsWriter(tmp_path) as w:
        w.write(2, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 3.0), (2, 2.0)]


def test_tensorboard_event_file_written(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 3.0})
        w.write(2, {"loss": 2.0})
        w.write(2, {"loss": 2.5}, split="eval")
    files = _event_files(tmp_path)
    assert len(files) == 1 and files[0].stat().st_size > 0

    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return  # tensorboard is optional; tensorboardX alone has no event reader
    acc = EventAccumulator(str(tmp_path / TB_DIR))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(2, 2.5)]


def test_disabled_writer_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir, enabled=False) as w:
        w.write(1, {"loss": 3.0})
    assert not run_dir.exists()


def _write_losses(run_dir, train, eval_=()):
    with MetricsWriter(run_dir) as w:
        for step, loss in train:
            w.write(step, {"loss": loss, "lr": 0.1})
        for step, loss in eval_:
            w.write(step, {"loss": loss}, split="eval")
    return run_dir / METRICS_FILE


@pytest.mark.parametrize("with_eval", [False, True])
def test_plot_writes_png(tmp_path, with_eval):
    train = [(s, 5.0 / s) for s in range(1, 21)]
    eval_ = [(10, 0.6), (20, 0.3)] if with_eval else []
    jsonl = _write_losses(tmp_path, train, eval_)
    out = plot_loss_curve(jsonl, tmp_path / "plots" / "loss.png", title="test", log_y=with_eval)
    assert out == tmp_path / "plots" / "loss.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_eval_only(tmp_path):
    jsonl = _write_losses(tmp_path, [], [(10, 0.6)])
    assert plot_loss_curve(jsonl, tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_with_nothing_to_plot_raises(tmp_path):
    jsonl = tmp_path / METRICS_FILE
    jsonl.write_text("")
    with pytest.raises(ValueError, match="no 'loss' values"):
        plot_loss_curve(jsonl, tmp_path / "loss.png")
    # Records without a loss are not plottable either.
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"lr": 0.1})
    with pytest.raises(ValueError, match="no 'loss' values"):
        plot_loss_curve(jsonl, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
        ("NVIDIA H100 80GB HBM3", "float32", 494.5),
        ("NVIDIA H200", "bfloat16", 989.0),
        ("NVIDIA H200", "float32", 494.5),
        ("NVIDIA H100 PCIe", "bfloat16", 756.5),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "float32", 156.0),
        ("cpu", "float32", None),
        ("TFRT_CPU_0", "bfloat16", None),
        ("NVIDIA H100 80GB HBM3", "int4", None),
    ],
)
def test_peak_tflops_lookup(kind, dtype, expected):
    assert peak_tflops(kind, dtype) == expected


def test_mfu_arithmetic():
    # 1,000 tokens/s x 6e11 FLOPs/token = 6e14 FLOP/s = 600 TFLOP/s.
    assert mfu(1_000.0, 6e11, 1_000.0) == pytest.approx(0.6)
    assert mfu(2_000.0, 6e11, 1_000.0) == pytest.approx(1.2)  # not clipped: exposes bad FLOP counts
    assert mfu(1_000.0, 6e11, None) is None
    with pytest.raises(ValueError):
        mfu(1_000.0, 6e11, 0.0)
