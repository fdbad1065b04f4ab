"""Ring attention and mixture of experts inside pipeline stages, against one device (fp32, 1e-5 of each leaf's scale).

With ``pipe > 1`` the executor's shard_map is manual over ``seq`` and the batch
axes (``expert`` among them), so every stage runs on its own rows and its own
block of every sequence: ring (or all-gather) attention over ``seq``, the
experts' two all-to-alls over ``expert``, and the MoE router's losses, which
must come out as one device's on each microbatch (``compat.NOTES``: the
reference accumulates over as many microbatches as the pipeline has).
"""

import functools

import jax
import pytest

from shardlib.training.step import make_grads_fn
from tests.support import assert_same_loss, assert_trees_close, first_batch, mesh_of, tiny_config
from tests.test_pipeline import assert_eval_runs_one_stage_per_device

TOLERANCE = 1e-5  # the loss: absolute, on a value of about 5
REL = 1e-5  # gradients: relative to each leaf's largest magnitude (tests.support.assert_trees_close)
METRIC_REL = 1e-5  # the MoE metrics: relative (the dropped fraction is a count, exact)
MICROBATCHES = 4
DENSE = {"n_layers": 4}
# Capacity 1: some (token, choice) pairs are dropped, so dropping runs inside the stages too.
MOE = {"n_layers": 4, "moe": {"n_experts": 4, "top_k": 2, "capacity_factor": 1.0, "period": 2}}
# MoE beside seq inside the stages: tests/test_compat.py's pipeline+seq+allgather+moe cell.
# The eval step, through the forward-only table, on each kind of stage (its schedules: tests/test_pipeline.py).
EVALUATED = {
    "1f1b-p2-seq2-data2-ring",
    "1f1b-p2-seq2-model2-tp-ring",
    "gpipe-p2-seq2-data2-fsdp-allgather",
    "1f1b-p2-expert2-data2-moe",
    "zb-h1-p2-expert2-model2-tp-moe",
}

CASES = {
    # schedule, mesh, sharding preset, attention.impl, model
    "1f1b-p2-seq2-data2-ring": ("1f1b", {"pipe": 2, "seq": 2, "data": 2}, "dp", "ring", DENSE),
    "zb-h1-p2-seq2-data2-ring": ("zb-h1", {"pipe": 2, "seq": 2, "data": 2}, "dp", "ring", DENSE),
    "1f1b-p2-seq2-model2-tp-ring": ("1f1b", {"pipe": 2, "seq": 2, "model": 2}, "tp", "ring", DENSE),
    "gpipe-p2-seq2-data2-fsdp-allgather": ("gpipe", {"pipe": 2, "seq": 2, "data": 2}, "fsdp", "allgather", DENSE),
    "1f1b-p2-expert2-data2-moe": ("1f1b", {"pipe": 2, "expert": 2, "data": 2}, "dp", "dense", MOE),
    "zb-h1-p2-expert2-data2-moe": ("zb-h1", {"pipe": 2, "expert": 2, "data": 2}, "dp", "dense", MOE),
    "zb-h1-p2-expert2-model2-tp-moe": ("zb-h1", {"pipe": 2, "expert": 2, "model": 2}, "tp", "dense", MOE),
    # pipeline.recompute=false: each forward keeps its pullback (the ring's, the experts' and the
    # router losses' residuals) for its backward.
    "1f1b-saved-p2-seq2-data2-ring": ("1f1b", {"pipe": 2, "seq": 2, "data": 2}, "dp", "ring", DENSE, False),
    "1f1b-saved-p2-expert2-data2-moe": ("1f1b", {"pipe": 2, "expert": 2, "data": 2}, "dp", "dense", MOE, False),
}


def _grads(cfg, mesh, evaluate=False):
    """(loss, grads, metrics) of the run's first batch, by the train step's own gradient function;
    with ``evaluate``, the run's eval loss of the same batch as well."""
    run, batch, params = first_batch(cfg, mesh)
    loss, grads, metrics = jax.jit(make_grads_fn(run.model, run.plan, run.shardings))(params, batch)
    eval_loss = None
    if evaluate:
        eval_step = run.eval_step.lower(params, batch).compile()
        assert_eval_runs_one_stage_per_device(eval_step, cfg, mesh)
        eval_loss = float(eval_step(params, batch))
    return run, float(loss), jax.device_get(grads), {k: float(v) for k, v in metrics.items()}, eval_loss


@functools.cache
def reference(model_key: str):
    """One device, no pipeline; an MoE model takes its losses per microbatch, as the pipeline does."""
    model = {"dense": DENSE, "moe": MOE}[model_key]
    accumulate = MICROBATCHES if "moe" in model else 1
    return _grads(tiny_config(model=model, grad_accum=accumulate), mesh_of(devices=1))[1:4]


def _model_key(model) -> str:
    return {id(DENSE): "dense", id(MOE): "moe"}[id(model)]


@pytest.mark.parametrize("case", list(CASES))
def test_stages_match_one_device(case):
    schedule, sizes, sharding, impl, model, *recompute = CASES[case]
    cfg = tiny_config(
        model=model,
        pipeline={"schedule": schedule, "microbatches": MICROBATCHES, "recompute": recompute[0] if recompute else True},
        sharding=sharding,
        attention={"impl": impl},
    )
    run, loss, grads, metrics, eval_loss = _grads(cfg, mesh_of(**sizes), evaluate=case in EVALUATED)
    features = set(run.plan.active_features())
    assert {"seq", impl} <= features if sizes.get("seq", 1) > 1 else "seq" not in features
    assert ("moe" in features) == ("moe" in model)
    ref_loss, ref_grads, ref_metrics = reference(_model_key(model))

    assert abs(loss - ref_loss) <= TOLERANCE, (loss, ref_loss)
    if eval_loss is not None:  # the cross-entropy alone, each microbatch's capacity and drops as in training
        assert_same_loss(eval_loss, loss)
        assert abs(eval_loss - ref_loss) <= TOLERANCE, (eval_loss, ref_loss)
    assert_trees_close(grads, ref_grads, rel=REL, what="gradient")  # v = 1: stored in logical order
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        assert abs(metrics[name] - value) <= METRIC_REL * abs(value), (name, metrics[name], value)
    if model is MOE:
        assert metrics["moe_dropped_fraction"] > 0, "capacity 1 should drop pairs here"
