"""The parallel plan is the one composition point: the train step, the eval step and the tools use it alike."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from shardlib.analysis.describe import main as describe_main
from shardlib.parallel.attention import AttentionPlan
from shardlib.parallel.pipeline import schedules
from shardlib.training.parallel_plan import build_plan
from shardlib.training.setup import setup_training
from tests.support import assert_same_loss, mesh_of, tiny_config

PIPELINE_MESHES = {
    "dp": {"pipe": 2, "data": 2},
    "fsdp": {"pipe": 2, "data": 2},
    "tp": {"pipe": 2, "model": 2},
    "fsdp_tp": {"pipe": 2, "data": 2, "model": 2},
}
SCHEDULES = [(name, 1) for name in schedules.SINGLE_CHUNK] + [("interleaved-1f1b", 1), ("interleaved-1f1b", 2)]
SCHEDULES += [(name, 2) for name in schedules.TWO_CHUNK]
assert {name for name, _ in SCHEDULES} == set(schedules.SCHEDULES)


def _checked_elsewhere() -> set[tuple[str, int, str]]:
    """(schedule, virtual stages, preset) whose eval-equals-train check runs with another test's compile."""
    from tests.test_compat import COMBOS
    from tests.test_pipeline import CASES

    checked = {(schedule, v, preset) for schedule, v, _, _, preset, *_ in CASES.values()}
    for combo in COMBOS:
        preset = next((p for p in PIPELINE_MESHES if p in combo), "dp")  # no preset's setup: the default
        if "pipeline" in combo:
            checked.add(("1f1b", 1, preset))  # FEATURE_SETUP's pipeline
        if "interleaved" in combo:
            checked.add(("interleaved-1f1b", 2, preset))
        if "zero-bubble" in combo:
            checked.add(("zb-h1", 1, preset))
        if "zero-bubble-v" in combo:
            checked.add(("zb-v", 2, preset))
    return checked


EVAL_CASES = [
    (schedule, v, preset)
    for schedule, v in SCHEDULES
    for preset in PIPELINE_MESHES
    if (schedule, v, preset) not in _checked_elsewhere()
]


def _batch(run, vocab: int, batch: int, length: int):
    tokens = np.random.default_rng(1).integers(0, vocab, (batch, length + 1), dtype=np.int32)
    return {
        k: jax.device_put(v, run.batch_sharding) for k, v in (("inputs", tokens[:, :-1]), ("targets", tokens[:, 1:]))
    }


def test_every_schedule_and_preset_checks_that_eval_runs_the_trained_network():
    assert {(s, v, p) for s, v in SCHEDULES for p in PIPELINE_MESHES} <= _checked_elsewhere() | set(EVAL_CASES)


@pytest.mark.parametrize(("schedule", "virtual", "preset"), EVAL_CASES, ids=lambda x: str(x))
def test_eval_loss_is_the_training_loss_of_the_same_batch(schedule, virtual, preset):
    """Before the plan, interleaved pipelines trained one layer order and evaluated another
    (the other schedule x preset cases check it in tests/test_pipeline.py and tests/test_compat.py)."""
    pipeline = {"schedule": schedule, "virtual_stages": virtual, "microbatches": 2}
    cfg = tiny_config(model={"n_layers": 4}, sharding=preset, batch_size=4, seq_len=8, pipeline=pipeline)
    run = setup_training(cfg, mesh_of(**PIPELINE_MESHES[preset]))
    params, _ = run.init_state()
    batch = _batch(run, cfg.model.vocab_size, 4, 8)
    train_loss, _ = run.grads(params, batch)
    assert_same_loss(run.eval_step(params, batch), train_loss)


@functools.cache
def _traced_attention(compression: str) -> tuple[int, int]:
    """(traces of the configured attention in the train step, in the eval step) with ``grad_compression``."""
    cfg = tiny_config(sharding="tp", attention={"impl": "fused"}, grad_compression=compression)
    mesh = mesh_of(data=2, model=2)
    plan = build_plan(cfg, mesh)
    calls, attend = {"n": 0}, plan.attention.fn

    def counted(*args):
        calls["n"] += 1
        return attend(*args)

    plan = dataclasses.replace(plan, attention=AttentionPlan(counted, plan.attention.order))
    run = setup_training(cfg, mesh, plan=plan)
    params, opt_state = jax.eval_shape(run.init_state)
    batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), np.int32) for k in ("inputs", "targets")}
    run.train_step.lower(params, opt_state, batch)
    in_train = calls["n"]
    run.eval_step.lower(params, batch)
    return in_train, calls["n"] - in_train


@pytest.mark.parametrize("compression", ["none", "bf16"])
def test_the_configured_attention_runs_in_training_with_and_without_compression(compression):
    """Before the plan, the compressed path built its loss without the attention: fused ran only in eval."""
    in_train, in_eval = _traced_attention(compression)
    assert in_train > 0 and in_eval > 0


def test_the_plan_decides_pipeline_and_experts_once():
    pipe = build_plan(tiny_config(model={"n_layers": 4}), mesh_of(data=4, pipe=2))
    assert pipe.pipeline is not None and pipe.pipeline.branching == "cond"
    assert pipe.active_features() == ("dp", "pipeline")
    text = pipe.describe()
    assert "pipeline 1f1b: p=2 m=4 v=1" in text and "features: dp, pipeline" in text
    moe = build_plan(tiny_config(model={"moe": {"n_experts": 4}}), mesh_of(data=2, expert=4))
    assert moe.experts is not None and "experts: 4 over expert=4" in moe.describe()
    assert build_plan(tiny_config(), mesh_of(data=8)).experts is None


def test_describe_prints_the_compatibility_table(capsys):
    assert describe_main(["--compat"]) == 0
    out = capsys.readouterr().out
    assert "feature compatibility" in out and "pipeline x moe:" in out


def test_describe_prints_the_plan(capsys):
    assert describe_main(["--config", "configs/tiny.yaml", "--mesh", "meshes/cpu-8-pipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert "parallel plan: data=4 x pipe=2, preset tp" in out and "pipeline 1f1b" in out


def test_a_reduction_dtype_beside_compressed_gradients_is_refused_naming_both():
    """``grad_compression`` sets what the reduction carries; ``model.reduce_dtype`` would be ignored."""
    with pytest.raises(ValueError, match=r"model\.reduce_dtype=bfloat16 does not combine with grad_compression=int8"):
        tiny_config(model={"reduce_dtype": "bfloat16"}, grad_compression="int8")
