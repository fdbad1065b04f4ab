"""DiLoCo in the analytic model and the planner: bytes per step averaged over H, and when to propose it.

No device work: layouts and predictions from axis sizes only (``shardlib.analysis.report.layout``).
"""

from __future__ import annotations

import math

import jax
import pytest

from shardlib.analysis.planner import make_plans
from shardlib.analysis.planner_diloco import propose_diloco
from shardlib.analysis.planner_output import format_plans
from shardlib.analysis.report.analytic import predict_terms
from shardlib.analysis.report.hardware import load_profile
from shardlib.analysis.report.layout import resolve_layout
from shardlib.analysis.report.measure import measure
from shardlib.analysis.report.memory import estimate_memory
from shardlib.analysis.report.report import build_report
from shardlib.training.config import load_config
from shardlib.training.setup import setup_training
from shardlib.training.train_state import abstract_state
from tests.support import mesh_of, tiny_config

SIZES = {"data": 4, "model": 2}


def tiny(*overrides):
    return load_config("configs/tiny.yaml", list(overrides))


def by_strategy(terms, strategy):
    return [t for t in terms if t.strategy == strategy]


@pytest.mark.parametrize(("compression", "share"), [("none", 1.0), ("bf16", 0.5)])
def test_diloco_moves_the_data_parallel_bytes_once_per_period(compression, share):
    synchronous = predict_terms(resolve_layout(tiny(), SIZES))
    diloco = predict_terms(
        resolve_layout(tiny("outer.algorithm=diloco", "outer.inner_steps=8", f"outer.compression={compression}"), SIZES)
    )
    per_step = sum(t.wire_bytes for t in by_strategy(synchronous, "data parallel"))  # 2(N-1)/N x P
    (outer,) = by_strategy(diloco, "diloco")
    assert outer.axes == ("data",) and outer.kind == "all-reduce"
    assert outer.wire_bytes == pytest.approx(per_step * share / 8)
    assert not by_strategy(diloco, "data parallel"), "an inner step reduced gradients over data"
    # Inside a replica nothing else changes: tensor parallelism moves what it moved.
    assert by_strategy(diloco, "tensor parallel") == by_strategy(synchronous, "tensor parallel")


def test_replicas_over_expert_keep_fsdp_over_data_inside():
    cfg = tiny("sharding=fsdp", "outer.algorithm=diloco", "outer.inner_steps=4", "outer.replica_axes=[expert]")
    terms = predict_terms(resolve_layout(cfg, {"expert": 2, "data": 2, "model": 1}))
    assert {t.axes for t in by_strategy(terms, "fsdp")} == {("data",)}
    assert [t.axes for t in by_strategy(terms, "diloco")] == [("expert",)]
    assert all("expert" not in t.axes for t in terms if t.strategy != "diloco")


def test_the_planner_proposes_diloco_when_data_crosses_slow_links():
    cfg, profile = tiny(), load_profile("h100")
    plans = make_plans(cfg, 16, profile)  # 8 per host: a data axis of 8 or more crosses hosts
    proposal = propose_diloco([p for p in plans if not p.dropped], cfg, profile)
    sizes = proposal.plan.sizes
    assert proposal is not None and sizes["data_replica"] * sizes["data"] * sizes["model"] > 8
    h = proposal.every
    assert proposal.outer_s / h <= 0.05 * proposal.inner_s
    assert h == 1 or proposal.outer_s / (h - 1) > 0.05 * proposal.inner_s  # the smallest such H
    assert proposal.step_s < proposal.plan.step_s
    text = " ".join(format_plans(plans, cfg, 16, profile).split())  # the output wraps at 100 columns
    assert f"outer.algorithm=diloco outer.inner_steps={h}" in text and "crosses hosts (InfiniBand NDR" in text
    # Overlapped, the fewest fragments whose all-reduce is no longer than an inner step.
    f = proposal.overlap_fragments(cfg.model.n_layers)
    assert f is not None and proposal.outer_s / f <= proposal.inner_s
    assert f == 1 or proposal.outer_s / max(d for d in range(1, f) if cfg.model.n_layers % d == 0) > proposal.inner_s
    assert "outer.overlap_steps=1" in text and "runs beside one inner step" in text
    # Inside one host (8 devices) nothing crosses a slow link; and a DiLoCo run is not told to use DiLoCo.
    assert propose_diloco(make_plans(cfg, 8, profile), cfg, profile) is None
    assert propose_diloco(plans, tiny("outer.algorithm=diloco"), profile) is None


@pytest.mark.parametrize(
    "outer",
    [
        {"algorithm": "diloco", "inner_steps": 4},
        {"algorithm": "local_sgd", "inner_steps": 4},
        {"algorithm": "diloco", "inner_steps": 4, "compression": "int8"},
    ],
    ids=["diloco", "local_sgd", "diloco-int8"],
)
def test_the_memory_estimate_holds_the_outer_loops_state(outer):
    """The anchor, the outer momentum and the residuals are state: the estimate's between-step
    bytes match the run's own state shards per device within 1% (without them: 60% of it)."""
    cfg, mesh = tiny_config(outer=outer), mesh_of(data=4, model=2)
    run = setup_training(cfg, mesh)
    leaves = jax.tree.leaves(abstract_state(run.model, run.tx, run.shardings))
    held = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    estimate = estimate_memory(resolve_layout(cfg, dict(mesh.shape)))
    assert estimate.state == pytest.approx(held, rel=0.01), (estimate, held)


@pytest.mark.parametrize("moments", ["none", "both"])
def test_the_report_measures_the_outer_step_averaged_over_h(moments):
    """The compiled outer step's all-reduces (the pseudo-gradient's, and the averaged AdamW moments'), at 1/H
    of a run per step, are what the model predicts on data."""
    outer = {"algorithm": "diloco", "inner_steps": 4, "average_moments": moments}
    cfg, mesh = tiny_config(outer=outer), mesh_of(data=4, model=2)
    report = build_report(resolve_layout(cfg, dict(mesh.shape)), measured=measure(cfg, mesh))
    (data,) = [r for r in report.axes if r.axis == "data"]
    outer = [c for c in report.measured.collectives if c.op_name.startswith("outer step")]
    assert outer and all(c.count == pytest.approx(1 / 4) for c in outer)
    assert data.measured == pytest.approx(data.predicted, rel=1e-6) and data.predicted > 0
