"""The pipeline executor against the same layers run sequentially on one device (fp32, 1e-5 of each leaf's scale)."""

import functools

import jax
import numpy as np
import pytest

from shardlib.analysis.report.collectives import find_collectives
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.analysis.report.layout import resolve_layout
from shardlib.analysis.report.memory import estimate_memory
from shardlib.parallel.pipeline.schedules import placement
from shardlib.parallel.pipeline.sends import layer_order
from shardlib.training.trainer import setup_training, train
from tests.support import assert_same_loss, assert_trees_close, first_batch, mesh_of, tiny_config

TOLERANCE = 1e-5  # the loss: absolute, on a value of about 5
REL = 1e-5  # gradients: relative to each leaf's largest magnitude (tests.support.assert_trees_close)
# 8 layers: enough for 4 stages x 2 virtual chunks.
MODEL = {"n_layers": 8}

CASES = {
    # schedule, virtual, mesh beside pipe, microbatches, sharding preset
    "gpipe-p2-data2": ("gpipe", 1, {"pipe": 2, "data": 2}, 4, "dp"),
    "1f1b-p2-data4": ("1f1b", 1, {"pipe": 2, "data": 4}, 4, "dp"),
    "interleaved-p2-data2": ("interleaved-1f1b", 2, {"pipe": 2, "data": 2}, 4, "dp"),
    "gpipe-p4-data2": ("gpipe", 1, {"pipe": 4, "data": 2}, 4, "dp"),
    "1f1b-p4-data2": ("1f1b", 1, {"pipe": 4, "data": 2}, 8, "dp"),
    "interleaved-p4": ("interleaved-1f1b", 2, {"pipe": 4}, 4, "dp"),
    # Tensor and FSDP parallelism inside the stages.
    "1f1b-p2-tp-model2-data2": ("1f1b", 1, {"pipe": 2, "model": 2, "data": 2}, 4, "tp"),
    "gpipe-p2-fsdp-data4": ("gpipe", 1, {"pipe": 2, "data": 4}, 4, "fsdp"),
    "interleaved-p2-fsdp_tp-model2-data2": ("interleaved-1f1b", 2, {"pipe": 2, "model": 2, "data": 2}, 4, "fsdp_tp"),
    "1f1b-p4-tp-model2": ("1f1b", 1, {"pipe": 4, "model": 2}, 4, "tp"),
    # Zero-bubble (backwards split into B and W) on 4 stages, beside FSDP and tensor parallelism;
    # tests/test_compat.py runs it on 2 stages beside every preset.
    "zb-h1-p4-fsdp-data2": ("zb-h1", 1, {"pipe": 4, "data": 2}, 8, "fsdp"),
    "zb-h1-p4-tp-model2": ("zb-h1", 1, {"pipe": 4, "model": 2}, 4, "tp"),
    # ZB-V: two chunks per stage in a V (the turn and the loss stay on a device), beside data,
    # FSDP and tensor parallelism; tests/test_compat.py runs it on 2 stages beside every preset.
    "zb-v-p2-data2": ("zb-v", 2, {"pipe": 2, "data": 2}, 4, "dp"),
    "zb-v-p4-fsdp-data2": ("zb-v", 2, {"pipe": 4, "data": 2}, 8, "fsdp"),
    "zb-v-p4-tp-model2": ("zb-v", 2, {"pipe": 4, "model": 2}, 4, "tp"),
    # pipeline.recompute=false: each forward keeps its residuals, each backward only applies them.
    "1f1b-saved-p2-data2": ("1f1b", 1, {"pipe": 2, "data": 2}, 4, "dp", False),
    "interleaved-saved-p2-fsdp-data2": ("interleaved-1f1b", 2, {"pipe": 2, "data": 2}, 4, "fsdp", False),
    "gpipe-saved-p4-tp-model2": ("gpipe", 1, {"pipe": 4, "model": 2}, 4, "tp", False),
    # Split tables without recomputation: F keeps the tapped stage's residuals, B applies them, W as ever
    # (1F1B's tables above then run split too, W right after B: plan.schedule_for).
    "zb-v-saved-p2-tp-model2": ("zb-v", 2, {"pipe": 2, "model": 2}, 4, "tp", False),
}


def grads_on(cfg, mesh):
    run, batch, params = first_batch(cfg, mesh)
    loss, grads = run.grads(params, batch)
    return float(loss), jax.device_get(grads), jax.device_get(params)


@functools.cache
def reference():
    """One device, no pipeline: the plain scanned model."""
    return grads_on(tiny_config(model=MODEL), mesh_of(devices=1))


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_sequential(case):
    schedule, virtual, sizes, microbatches, sharding, *recompute = CASES[case]
    pipeline = {"schedule": schedule, "virtual_stages": virtual, "microbatches": microbatches}
    pipeline["recompute"] = recompute[0] if recompute else True
    cfg = tiny_config(model=MODEL, pipeline=pipeline, sharding=sharding)
    run, batch, params = first_batch(cfg, mesh_of(**sizes))
    loss, grads = run.grads(params, batch)
    # The eval step runs the network the pipeline trains, through the schedule's forward-only table.
    eval_step = run.eval_step.lower(params, batch).compile()
    eval_loss = float(eval_step(params, batch))
    assert_same_loss(eval_loss, loss)
    assert_eval_runs_one_stage_per_device(eval_step, cfg, run.mesh)
    loss, grads, params = float(loss), jax.device_get(grads), jax.device_get(params)
    ref_loss, ref_grads, ref_params = reference()
    assert abs(eval_loss - ref_loss) <= TOLERANCE, (eval_loss, ref_loss)

    # The stack is stored in pipeline order: stored layer i is logical layer order[i]. The run
    # starts from the same network as the reference, in that layout, so it computes the same loss.
    order = layer_order(MODEL["n_layers"], sizes["pipe"], virtual, placement(schedule))
    for name, stored in params["layers"].items():
        np.testing.assert_array_equal(stored, ref_params["layers"][name][order], err_msg="both runs start alike")
    ref_grads = {**ref_grads, "layers": jax.tree.map(lambda g: g[order], ref_grads["layers"])}  # storage order

    assert abs(loss - ref_loss) <= TOLERANCE, (loss, ref_loss)
    assert_trees_close(grads, ref_grads, rel=REL, what="gradient")


# The eval step's own memory (``MemoryEstimate.eval_working``) against the compiled step's temporaries:
# at these shapes XLA's fixed per-branch buffers weigh more than in a real model; the sequential
# eval these replace, which all-gathered every stage's layers, read 0.14-0.3 of the estimate.
EVAL_MEMORY_BAND = (0.6, 1.7)


def assert_eval_runs_one_stage_per_device(compiled, cfg, mesh) -> None:
    """The compiled eval step of a pipelined run holds each stage's layers on its own devices only:
    its arguments are the stored shards (the estimate's parameters and batch, to the byte), nothing
    over ``pipe`` but permutes of one microbatch's stage activation, scalar sums and the tokens (no
    all-gather of the stack), and its temporaries are what the memory estimate counts for it."""
    layout = resolve_layout(cfg, dict(mesh.shape))
    estimate = estimate_memory(layout, "float32")
    activation = layout.rows_per_device * (cfg.seq_len // layout.seq_shards) * cfg.model.d_model * 4
    over_pipe = [c for c in find_collectives(parse_hlo(compiled.as_text()), dict(mesh.shape)) if "pipe" in c.axes]
    assert {c.kind for c in over_pipe} == {"collective-permute", "all-reduce"}, over_pipe
    for c in over_pipe:
        if c.dtype == "s32":  # the batch's tokens, into the attention's order (zig-zag ring), as in training
            assert c.buffer_bytes <= activation, c
        else:
            assert c.buffer_bytes == activation if c.kind == "collective-permute" else c.buffer_bytes <= 16, c
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes == estimate.params + estimate.batch
    low, high = EVAL_MEMORY_BAND
    assert low <= estimate.eval_working / memory.temp_size_in_bytes <= high, (estimate.eval_working, memory)
    assert estimate.eval_total < estimate.total == estimate.peak  # a pipelined eval needs less than its training


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "zb-v"])
def test_one_stage_pipeline_matches_sequential(schedule):
    """p = 1: the single stage embeds and takes the loss in one branch (what bench/pipeline_overhead.py times)."""
    from shardlib.models.pipeline_stages import make_pipeline_grads
    from shardlib.parallel.pipeline.plan import PipelineSettings, plan_pipeline

    mesh = mesh_of(devices=1)
    run, batch, params = first_batch(tiny_config(model=MODEL), mesh)
    plan = plan_pipeline(
        PipelineSettings(schedule, 4, 2 if schedule == "zb-v" else 1),
        1,
        MODEL["n_layers"],
        16,
        collectives_inside_stages=False,
        platform="cpu",
    )
    grads_fn = jax.jit(make_pipeline_grads(run.model.graphdef, run.model.params, plan, mesh, None))
    loss, grads, metrics = grads_fn(params, batch)
    assert metrics == {}
    ref_loss, ref_grads, _ = reference()
    assert abs(float(loss) - ref_loss) <= TOLERANCE, (float(loss), ref_loss)
    assert_trees_close(jax.device_get(grads), ref_grads, rel=REL, what="gradient")


def test_without_recomputation_1f1b_runs_split_and_moe_split_tables_are_refused():
    from shardlib.parallel.pipeline.plan import PipelineSettings, plan_pipeline

    def plan(schedule, moe_period=0):
        settings = PipelineSettings(schedule, 4, recompute=False)
        return plan_pipeline(settings, 2, 8, 16, collectives_inside_stages=False, platform="cpu", moe_period=moe_period)

    assert plan("1f1b").schedule.split_backward and not plan("1f1b", moe_period=2).schedule.split_backward
    with pytest.raises(ValueError, match="pipeline.recompute=false does not apply to zb-h1 with an MoE model"):
        plan("zb-h1", moe_period=2)


def test_1f1b_needs_less_activation_memory_than_gpipe():
    """m = 4p microbatches: GPipe keeps all m stage inputs, 1F1B at most p."""
    temps = {}
    for schedule in ("gpipe", "1f1b"):
        cfg = tiny_config(model=MODEL, batch_size=32, pipeline={"schedule": schedule, "microbatches": 8})
        run = setup_training(cfg, mesh_of(pipe=2))
        params, _ = run.init_state()
        batch = {
            k: jax.ShapeDtypeStruct((32, cfg.seq_len), np.int32, sharding=run.batch_sharding)
            for k in ("inputs", "targets")
        }
        temps[schedule] = run.grads.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    # Each buffered stage input is [4, 16, 32] fp32 = 8 KiB; GPipe buffers 8, 1F1B 2.
    assert temps["gpipe"] - temps["1f1b"] >= (8 - 2) * 8 * 1024, temps


def test_train_with_pipe_2_learns_and_resumes(tmp_path):
    cfg = tiny_config(
        tmp_path,
        model=MODEL,
        steps=6,
        pipeline={"schedule": "1f1b"},
        checkpoint={"every": 3},
        optimizer={"lr": 3e-2, "warmup_steps": 1},
    )
    mesh = mesh_of(data=4, pipe=2)
    quiet = {"progress": False, "log": lambda _: None}
    first = train(cfg, mesh, stop_at=3, **quiet)
    second = train(cfg, mesh, **quiet)
    assert second.start_step == 3 and len(second.losses) == 3
    losses = first.losses + second.losses
    assert losses[-1] < losses[0] - 0.3, losses


def test_gradients_keep_their_parameters_sharding_beside_the_pipeline():
    cfg = tiny_config(model=MODEL, sharding="fsdp_tp", pipeline={"schedule": "1f1b"})
    run = setup_training(cfg, mesh_of(pipe=2, model=2, data=2))
    params, _ = run.init_state()
    batch = {
        k: jax.device_put(np.zeros((cfg.batch_size, cfg.seq_len), np.int32), run.batch_sharding)
        for k in ("inputs", "targets")
    }
    grads = run.grads(params, batch)[1]
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        p = functools.reduce(lambda tree, key: tree[key.key], path, params)
        assert _trimmed(g.sharding.spec) == _trimmed(p.sharding.spec), (path, g.sharding.spec, p.sharding.spec)


def _trimmed(spec):
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def test_a_dimension_split_over_a_manual_and_an_automatic_axis_is_refused_by_name():
    from jax.sharding import PartitionSpec as P

    from shardlib.parallel.pipeline.executor import _manual_only

    with pytest.raises(ValueError, match=r"layers/\['q'\]: dimension 1 is split over \('data', 'model'\)"):
        _manual_only({"q": P("pipe", ("data", "model"))}, {"pipe", "data"}, "layers")


def test_the_pipeline_runs_the_configured_attention():
    """``attention.impl`` reaches the stages: an attention that outputs zeros changes the loss."""
    import jax.numpy as jnp

    from shardlib.models.pipeline_stages import make_pipeline_grads
    from shardlib.parallel.attention import AttentionPlan
    from shardlib.parallel.pipeline.plan import PipelineSettings, plan_pipeline

    mesh = mesh_of(devices=1)
    run, batch, params = first_batch(tiny_config(model=MODEL), mesh)
    plan = plan_pipeline(
        PipelineSettings("1f1b", 4), 1, MODEL["n_layers"], 16, collectives_inside_stages=False, platform="cpu"
    )
    silent = AttentionPlan(lambda q, k, v, q_pos, kv_pos: jnp.zeros_like(q))
    grads_fn = make_pipeline_grads(run.model.graphdef, run.model.params, plan, mesh, None, attention=silent)
    loss, _, _ = jax.jit(grads_fn)(params, batch)
    assert abs(float(loss) - reference()[0]) > 1e-3
