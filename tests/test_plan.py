"""shardlib.analysis.planner: the top plan is the one a hand calculation picks, and it compiles as predicted (within 10%)."""

import itertools

import pytest

from shardlib.analysis.plan_candidates import candidate_meshes
from shardlib.analysis.planner import make_plans, verify
from shardlib.analysis.planner_output import format_plans
from shardlib.analysis.report.hardware import Profile
from tests.support import tiny_config

N = 8


def flat_profile(memory_bytes: float) -> Profile:
    """One link everywhere, no latency, compute for free: the step time is the bytes moved."""
    link = {"name": "link", "bandwidth_gb_s": 1.0, "latency_us": 0.0}
    return Profile(
        name="flat",
        description="test",
        peak_tflops={"float32": 1e9},
        memory_gib=memory_bytes / 2**30,
        usable_fraction=1.0,
        devices_per_host=N,
        links={"within_host": link, "across_hosts": link},
        mfu=1.0,
    )


def config():
    # Small batch: activations are negligible beside the parameter state, so memory is a hand calculation.
    return tiny_config(batch_size=8, seq_len=8)


def param_bytes(cfg) -> int:
    return cfg.model.num_params() * 4


def test_candidates_cover_every_factorization():
    meshes = candidate_meshes(8)
    assert len(meshes) == 20  # ordered quadruples (data, pipe, seq, model) with product 8
    assert all(m["data"] * m["pipe"] * m["seq"] * m["model"] == 8 and m["expert"] == 1 for m in meshes)
    assert candidate_meshes(8, ("data",)) == [
        {"data_replica": 1, "data": 8, "pipe": 1, "expert": 1, "seq": 1, "model": 1}
    ]


def test_ample_memory_picks_data_parallel_and_it_compiles_as_predicted():
    """By hand: DP moves 2(N-1)/N * P; FSDP at least 3(N-1)/N * (P - embedding table). DP wins."""
    cfg = config()
    p = param_bytes(cfg)
    dp = 2 * (N - 1) / N * p
    fsdp_at_least = 3 * (N - 1) / N * (p - cfg.model.vocab_size * cfg.model.d_model * 4)
    assert dp < fsdp_at_least
    plans = make_plans(cfg, N, flat_profile(2**30), presets=("dp", "fsdp"), axes=("data",))
    best = plans[0]
    assert (best.sizes["data"], best.sharding) == (N, "dp")
    assert sum(best.time.comm_s_per_axis.values()) * 1e9 == pytest.approx(dp, rel=0.02)
    text, misses = verify(plans, cfg, 1)
    assert not misses, text
    assert "ok" in text and "GAP" not in text


def test_memory_limit_picks_fsdp_and_it_compiles_as_predicted():
    """By hand, with 2 P of memory: DP keeps params, gradients and two AdamW moments whole (>= 4 P) and does
    not fit; FSDP keeps them over 8 devices (4 P / 8) plus one gathered layer and its gradient, and fits."""
    cfg = config()
    p = param_bytes(cfg)
    limit = 2 * p
    assert 4 * p > limit
    plans = make_plans(cfg, N, flat_profile(limit), presets=("dp", "fsdp"), axes=("data",))
    fitting = [x for x in plans if not x.dropped]
    assert [(x.sizes["data"], x.sharding) for x in fitting] == [(N, "fsdp")]
    dropped = next(x for x in plans if x.sharding == "dp" and x.sizes["data"] == N)
    assert dropped.dropped.startswith("needs")
    assert fitting[0].memory.state == pytest.approx(3 * p / N, rel=0.01)
    text, misses = verify(plans, cfg, 1)
    assert not misses, text
    assert "only sliced" not in text  # the gradients leave as reduce-scatters: no gap to explain


def test_plans_are_ranked_and_explained():
    from shardlib.analysis.report.hardware import load_profile

    cfg = config()
    profile = load_profile("h100")
    plans = make_plans(cfg, N, profile)
    fitting = [x for x in plans if not x.dropped]
    assert fitting and all(a.step_s <= b.step_s for a, b in itertools.pairwise(fitting))
    text = format_plans(plans, cfg, N, profile)
    assert "best:" in text and "beats" in text
    assert "does not divide" in text  # kv_heads=2 cannot split over model=4 or 8
    reasons = {x.dropped.split(":")[0] for x in plans if x.dropped}
    assert "no model axis for tensor parallelism (same as the preset without it)" in reasons


# --------------------------------------------------------------------------- --verify beyond data-only meshes
# --presets/--axes put the plan under test at the top of the ranking.


def _verified(presets, axes, sizes, schedule=None, cfg=None):
    """verify() on the one fitting plan of ``presets`` over ``axes`` with mesh ``sizes`` (and pipeline
    ``schedule``) of ``cfg`` (default ``config()``): (text, misses)."""
    cfg = cfg or config()
    plans = make_plans(cfg, N, flat_profile(2**30), presets=presets, axes=axes)
    chosen = [
        p
        for p in plans
        if not p.dropped
        and {a: s for a, s in p.sizes.items() if s > 1} == sizes
        and (schedule is None or p.cfg.pipeline.schedule == schedule)
    ]
    assert len(chosen) == 1, [p.label for p in plans]
    text, misses = verify(chosen, cfg, 1)
    assert text.startswith(f"verify {chosen[0].label} "), text
    return text, misses


def test_verify_compiles_tensor_parallel_as_predicted():
    text, misses = _verified(("tp",), ("data", "model"), {"data": 4, "model": 2})
    assert not misses, text
    assert "  model  predicted" in text and "GAP" not in text


def test_verify_compiles_fsdp_over_data_and_seq_as_predicted():
    text, misses = _verified(("fsdp",), ("data", "seq"), {"data": 4, "seq": 2})
    assert not misses, text
    assert "  seq    predicted" in text and "GAP" not in text


def test_verify_compiles_fsdp_tp_as_predicted():
    """data=4 x model=2: the layers' gradients reduce-scatter over data on their model block (parallel.reduction)."""
    text, misses = _verified(("fsdp_tp",), ("data", "model"), {"data": 4, "model": 2})
    assert not misses, text


def test_verify_compiles_tensor_parallel_beside_seq_as_predicted():
    """data=2 x seq=2 x model=2: the gradients are one all-reduce over data and seq (XLA alone reduced them twice)."""
    text, misses = _verified(("tp",), ("data", "seq", "model"), {"data": 2, "seq": 2, "model": 2})
    assert not misses, text


@pytest.mark.parametrize("schedule, recompute", [("1f1b", True), ("1f1b", False), ("zb-h1", True), ("zb-v", True)])
def test_verify_compiles_a_pipelined_plan_as_predicted(schedule, recompute):
    """data=4 x pipe=2, at the planner's microbatches: bytes per axis and memory (from the schedule's
    table, the gradient sums the tick loop carries and, without recomputation, the residuals kept
    from each forward to its backward) agree with the compiled step."""
    pipeline = {"recompute": recompute}
    cfg = tiny_config(batch_size=8, seq_len=8, model={"n_layers": 4}, pipeline=pipeline)  # ZB-V: 2 x 2 chunks
    text, misses = _verified(("dp",), ("data", "pipe"), {"data": 4, "pipe": 2}, schedule, cfg)
    assert not misses, text
    assert f"({schedule} m=" in text and "  pipe   predicted" in text and "GAP" not in text


def test_a_batch_too_small_for_the_devices_makes_the_planner_pipeline():
    """1b with 8 sequences on 8 hosts of 8 H100s with 200 Gb/s per GPU between hosts: data stops at
    8 (one row each) and TP at the 8 KV heads, so without a pipeline data x model = 8 x 8 sends every
    gradient across the slow link. A pipeline of 2 halves what each device holds and sends, bubble and
    recomputed forwards (their tensor-parallel all-reduces too) included, and the planner says so
    beside the best plan without one. (At the profile's 400 Gb/s the two tie within 3%.)"""
    from shardlib.analysis.report.hardware import load_profile
    from shardlib.training.config import load_config

    cfg = load_config("configs/1b.yaml", ["batch_size=8", "grad_accum=1"])
    h100 = load_profile("h100")
    slow = h100.links.across_hosts.model_copy(update={"bandwidth_gb_s": 25.0})
    profile = h100.model_copy(update={"links": h100.links.model_copy(update={"across_hosts": slow})})
    plans = make_plans(cfg, 64, profile)
    best = plans[0]
    assert best.sizes["pipe"] > 1 and 0 < best.bubble < 0.5, best.label
    flat = next(p for p in plans if not p.dropped and p.sizes["pipe"] == 1)
    assert best.step_s < flat.step_s
    text = format_plans(plans, cfg, 64, profile, top=len(plans))
    assert max(len(line) for line in text.splitlines()) <= 100
    unwrapped = text.replace("\n    ", " ")  # an explanation wraps at 100 columns, continued 4 in
    why = next(line for line in unwrapped.splitlines() if line.startswith(f"  beats {flat.label} "))
    assert "exposed communication" in why and "over InfiniBand" in why, why
    # Pipelines beside seq are weighed (the compatibility table lets them compose).
    assert any(p.sizes["pipe"] > 1 and p.sizes["seq"] > 1 and not p.dropped.startswith("refused") for p in plans)


def test_pipelines_beside_seq_and_experts_are_planned_and_verified():
    """pipe x seq and, for MoE, pipe x expert plans are ranked; only two chunks per stage (interleaved,
    ZB-V) with MoE are refused (the table's reason); data 2 x pipe 2 x expert 2 compiles as predicted (the experts'
    all-to-alls inside the stages, on every used branch of every tick)."""
    moe = tiny_config(batch_size=8, seq_len=8, model={"n_layers": 4, "moe": {"n_experts": 4, "period": 2}})
    plans = make_plans(moe, N, flat_profile(2**30))
    ranked = [p for p in plans if not p.dropped]
    assert any(p.sizes["pipe"] > 1 and p.sizes["seq"] > 1 for p in ranked)
    assert any(p.sizes["pipe"] > 1 and p.sizes["expert"] > 1 for p in ranked)
    refused = [p for p in plans if p.dropped.startswith("refused")]
    two_chunks = ("virtual_stages=2 does not combine with model.moe", "(zb-v) does not combine with model.moe")
    assert refused and all(any(why in p.dropped for why in two_chunks) for p in refused)
    chosen = [
        p
        for p in ranked
        if {a: s for a, s in p.sizes.items() if s > 1} == {"data": 2, "pipe": 2, "expert": 2}
        and p.cfg.pipeline.schedule == "1f1b"
        and p.sharding == "dp"
    ]
    text, misses = verify(chosen, moe, 1)
    assert not misses, text
    assert "  expert predicted" in text and "GAP" not in text


def test_plan_cli_verifies_a_tensor_parallel_plan(capsys):
    """``python -m shardlib.analysis.planner ... --presets tp --axes data,model --verify 1``: the top plan is tp and it agrees."""
    from shardlib.analysis.planner import main

    argv = ["--config", "configs/tiny.yaml", "--devices", str(N), "--presets", "tp", "--axes", "data,model"]
    assert main([*argv, "--verify", "1", "batch_size=8", "seq_len=16"]) == 0
    out = capsys.readouterr().out
    assert "verify data=4 x model=2 tp (grad_accum 1) (compiled in" in out, out
    assert "  model  predicted" in out and "GAP" not in out, out


def test_a_plan_whose_eval_step_does_not_fit_is_dropped():
    """The eval step runs beside the state on a device's whole batch (no accumulation splits it):
    at grad_accum 16 with a large vocabulary its logits outweigh what the training step holds per
    microbatch. The estimate counts it (the compiled eval step, with the optimizer state it leaves
    resident, within 10%), and a memory the training step alone would fit drops the plan."""
    import jax
    import numpy as np

    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.analysis.report.memory import estimate_memory
    from shardlib.training.setup import setup_training
    from tests.support import mesh_of

    cfg = tiny_config(grad_accum=16, batch_size=128, model={"vocab_size": 8192})
    run = setup_training(cfg, mesh_of(data=N))
    estimate = estimate_memory(resolve_layout(cfg, dict(run.mesh.shape)), "float32")
    params, _ = jax.eval_shape(run.init_state)
    batch = {
        k: jax.ShapeDtypeStruct((128, cfg.seq_len), np.int32, sharding=run.batch_sharding)
        for k in ("inputs", "targets")
    }
    compiled = run.eval_step.lower(params, batch).compile().memory_analysis()
    resident = compiled.argument_size_in_bytes + compiled.temp_size_in_bytes + estimate.optimizer
    assert estimate.eval_total == pytest.approx(resident, rel=0.1)
    assert estimate.total < estimate.eval_total == estimate.peak
    limit = (estimate.total + estimate.eval_total) / 2
    plans = make_plans(cfg, N, flat_profile(limit), presets=("dp",), axes=("data",))
    assert plans and all(p.dropped for p in plans)
    assert "(its eval step)" in plans[0].dropped, plans[0].dropped


def test_fused_attention_keeps_no_score_matrix_so_a_7b_model_fits_at_sequence_4096():
    """7B (Llama widths) at sequence 4096, one row per device on 8 H100s under FSDP, no remat: XLA's
    dense attention keeps each layer's [L, L] float32 scores (over 80 GB); the fused kernel does not."""
    from shardlib.analysis.report.hardware import load_profile
    from shardlib.training.config import load_config

    widths = ["model.d_model=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=32"]
    rest = ["model.d_ff=11008", "seq_len=4096", "batch_size=8", "grad_accum=1", "model.remat=none"]
    fits = {}
    for impl in ("dense", "fused"):
        cfg = load_config("configs/1b.yaml", [*widths, *rest, f"attention.impl={impl}"])
        (plan,) = make_plans(cfg, N, load_profile("h100"), presets=("fsdp",), axes=("data",))
        fits[impl] = not plan.dropped
    assert fits == {"dense": False, "fused": True}


def test_overlap_follows_the_schedule_and_groups_across_hosts_share_their_nics():
    """By hand on the h100 profile: a gradient all-reduced once after accumulation (one op over the
    stacked layers) is exposed whole, per-layer ones hide behind the backward pass; FSDP over 16 GPUs
    on 2 hosts moves at 8 NICs' bandwidth, HSDP's data_replica (1 GPU per host per group) at one's."""
    from shardlib.analysis.report.analytic import predict_terms
    from shardlib.analysis.report.compute import hardware_flops
    from shardlib.analysis.report.hardware import estimate_time, group_inside_host, load_profile
    from shardlib.analysis.report.layout import resolve_layout

    h100 = load_profile("h100")
    sizes = dict.fromkeys(("data_replica", "data", "pipe", "expert", "seq", "model"), 1)
    assert group_inside_host(("data",), {**sizes, "data": 16}, 8) == 8
    assert group_inside_host(("data_replica",), {**sizes, "data_replica": 2, "data": 8}, 8) == 1
    exposed = {}
    for accumulation in (1, 2):
        cfg = tiny_config(batch_size=32, seq_len=8, grad_accum=accumulation)
        layout = resolve_layout(cfg, {"data": 16})
        t = estimate_time(predict_terms(layout), layout.sizes, hardware_flops(layout), "float32", h100, n_layers=2)
        layers = [x for x in t.terms if "(layer)" in x.term.what]
        exposed[accumulation] = {x.window for x in layers}
        assert t.step_s >= t.compute_s
    assert exposed == {1: {"backward"}, 2: {"none"}}


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_a_layers_bytes_from_two_traces_are_its_bytes_at_any_rows(rows):
    """The memory estimate traces a layer at 2 and 3 rows and extends the line (``_linear_in_rows``):
    exactly the direct trace's bytes, for each remat policy, the fused attention and a split's taps."""
    from shardlib.analysis.report.memory import layer_residual_bytes, layer_tap_bytes

    dims = (64, 128, 4, 2, 32, 256)
    for dtype, remat, attention in [
        ("bfloat16", "none", "dense"),
        ("float32", "full", "dense"),
        ("bfloat16", "save_matmuls", "dense"),
        ("float32", "none", "fused"),
    ]:
        args = (rows, *dims, dtype, "float32", remat, attention)
        assert layer_residual_bytes(*args) == layer_residual_bytes.traced(*args), args
    args = (rows, *dims, "float32", "float32")
    assert layer_tap_bytes(*args) == layer_tap_bytes.traced(*args)
