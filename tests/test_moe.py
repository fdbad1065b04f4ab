"""Mixture of experts with expert parallelism (shardlib/models/moe.py, shardlib/parallel/experts.py).

The sharded layer (tokens dispatched over the `expert` axis with two
all-to-alls) against a dense reference written independently here; dropping
against a numpy replay of the capacity rule; the auxiliary losses against
their formulas; the all-to-all bytes in the compiled HLO against the buffer
formula; and the whole model trained on data 2 x expert 4 against one device.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.analysis import hlo
from shardlib.analysis.describe import describe
from shardlib.analysis.report.layout import resolve_layout
from shardlib.analysis.report.measure import measure
from shardlib.analysis.report.report import build_report
from shardlib.core.rules import preset_rules
from shardlib.core.sharding import ActivationSharding
from shardlib.models.moe import EXPERT_WEIGHT_AXES, ExpertWeights, MoEWeights, capacity, expert_ffn, moe_mlp, route
from shardlib.parallel.experts import dispatch_buffer_bytes, expert_dispatch, expert_parallel_dispatch
from shardlib.training.config import ConfigError
from shardlib.training.data import load_token_splits
from shardlib.training.trainer import setup_training, train
from tests.support import assert_trees_close, mesh_of, tiny_config

TOLERANCE = 1e-5
B, L, D, E, F = 8, 8, 16, 8, 32  # 8 rows: one per device on data 2 x expert 4
MOE = {"n_experts": 8, "top_k": 2, "capacity_factor": 1.5, "period": 2, "expert_d_ff": 32}


@functools.cache
def expert_mesh():
    return mesh_of(data=2, expert=4)


def layer_inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(ks[0], (B, L, D), jnp.float32)
    w = MoEWeights(
        jax.random.normal(ks[1], (D, E), jnp.float32),
        ExpertWeights(
            0.3 * jax.random.normal(ks[2], (E, D, F), jnp.float32),
            0.3 * jax.random.normal(ks[3], (E, D, F), jnp.float32),
            0.3 * jax.random.normal(ks[4], (E, F, D), jnp.float32),
        ),
    )
    probe = jax.random.normal(ks[5], (B, L, D), jnp.float32)
    return h, w, probe


def place(h, w, probe, mesh):
    """Tokens over (data, expert) as the rules put them; experts over `expert`."""
    rows = NamedSharding(mesh, P(("data", "expert")))
    experts = NamedSharding(mesh, P("expert"))
    w = MoEWeights(jax.device_put(w.router, NamedSharding(mesh, P())), jax.device_put(w.experts, experts))
    return jax.device_put(h, rows), w, jax.device_put(probe, rows)


def dense_reference(h, w: MoEWeights, top_k):
    """Each token through its top-k experts, weighted by the router: every expert on every token."""
    probs_BxLxE = jax.nn.softmax(h @ w.router, axis=-1)
    kth_BxLx1 = jnp.sort(probs_BxLxE, axis=-1)[..., -top_k, None]
    chosen_BxLxE = jnp.where(probs_BxLxE >= kth_BxLx1, probs_BxLxE, 0.0)
    if top_k > 1:
        chosen_BxLxE = chosen_BxLxE / jnp.sum(chosen_BxLxE, axis=-1, keepdims=True)
    g = w.experts
    hidden_BxLxExF = jax.nn.silu(jnp.einsum("bld,edf->blef", h, g.gate)) * jnp.einsum("bld,edf->blef", h, g.up)
    out_BxLxExD = jnp.einsum("blef,efd->bled", hidden_BxLxExF, g.down)
    return jnp.einsum("bled,ble->bld", out_BxLxExD, chosen_BxLxE)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sharded_layer_matches_dense_reference(top_k):
    """No drops (capacity factor E / k): forward and every gradient within 1e-5 of the dense reference."""
    mesh = expert_mesh()
    shard = ActivationSharding(preset_rules("dp"), mesh)
    h, w, probe = place(*layer_inputs(), mesh)

    def sharded(h, w, probe):
        y, stats = moe_mlp(h, w, top_k=top_k, capacity_factor=E / top_k, dispatch=expert_dispatch(shard))
        return jnp.sum(y * probe), (y, stats.dropped)

    def reference(h, w, probe):
        y = dense_reference(h, w, top_k)
        return jnp.sum(y * probe), y

    with jax.set_mesh(mesh):
        (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(h, w, probe)
    h, w, probe = jax.device_get((h, w, probe))
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(reference, argnums=(0, 1), has_aux=True))(h, w, probe)

    assert float(dropped) == 0
    assert_trees_close(jax.device_get(y), y_ref, rel=TOLERANCE, what="output")
    for path, g_ref in jax.tree_util.tree_flatten_with_path(grads_ref)[0]:
        assert np.abs(g_ref).max() > 1e-3, f"gradient {jax.tree_util.keystr(path)} is trivially small"
    assert_trees_close(jax.device_get(grads), grads_ref, rel=TOLERANCE, what="gradient")


def replay_capacity(expert_BxLxR, cap, n_experts=E):
    """Numpy replay of the rule: per row, first choices in token order, then second choices; kept while < cap."""
    b, length, k = expert_BxLxR.shape
    kept = np.zeros_like(expert_BxLxR, dtype=bool)
    for row in range(b):
        taken = np.zeros(n_experts, int)
        for choice in range(k):
            for t in range(length):
                e = expert_BxLxR[row, t, choice]
                kept[row, t, choice] = taken[e] < cap
                taken[e] += 1
    return kept


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_drops_exactly_past_capacity(capacity_factor):
    """Sharded dispatch keeps exactly the pairs the capacity rule keeps; a dropped pair contributes zero."""
    mesh = expert_mesh()
    shard = ActivationSharding(preset_rules("dp"), mesh)
    h, w, _ = layer_inputs(1)
    rng = np.random.default_rng(0)
    # Skewed choices (experts 0 and 1 popular) so some (row, expert) pairs overflow and others do not.
    first = rng.choice(E, size=(B, L), p=[0.3, 0.2] + [0.5 / 6] * 6)
    second = (first + 1 + rng.integers(0, E - 1, size=(B, L))) % E
    expert_BxLxR = np.stack([first, second], axis=-1).astype(np.int32)
    weight_BxLxR = rng.uniform(0.1, 1.0, size=(B, L, 2)).astype(np.float32)
    cap = capacity(L, E, 2, capacity_factor)
    kept = replay_capacity(expert_BxLxR, cap)
    assert 0 < (~kept).sum() < kept.size, "the case must drop some pairs and keep others"

    rows = NamedSharding(mesh, P(("data", "expert")))
    args = jax.device_put((h, expert_BxLxR, weight_BxLxR), rows)
    experts = jax.device_put(w.experts, NamedSharding(mesh, P("expert")))
    with jax.set_mesh(mesh):
        dispatch = functools.partial(
            expert_parallel_dispatch, shard, capacity_factor=capacity_factor, weight_axes=EXPERT_WEIGHT_AXES
        )
        y, dropped = jax.jit(dispatch, static_argnums=3)(*args, expert_ffn, experts)

    g = w.experts
    hidden = jax.nn.silu(jnp.einsum("bld,edf->blef", h, g.gate)) * jnp.einsum("bld,edf->blef", h, g.up)
    every_BxLxExD = np.asarray(jnp.einsum("blef,efd->bled", hidden, g.down))
    picked_BxLxKxD = np.take_along_axis(every_BxLxExD, expert_BxLxR[..., None], axis=2)
    expected = np.sum(picked_BxLxKxD * (weight_BxLxR * kept)[..., None], axis=2)
    assert float(dropped) == (~kept).sum()
    assert_trees_close(jax.device_get(y), expected, rel=TOLERANCE, what="output")


def test_capacity_formula():
    assert capacity(tokens_per_group=16, n_experts=8, top_k=2, capacity_factor=1.25) == 5  # ceil(5.0)
    assert capacity(16, 8, 1, 1.0) == 2
    assert capacity(16, 8, 1, 1.1) == 3  # ceil(2.2)
    assert capacity(4, 64, 1, 0.5) == 1  # never below one slot


def test_load_balancing_and_z_loss_equal_their_formulas():
    h, w, _ = layer_inputs(2)
    routing = jax.jit(route, static_argnums=2)(h, w.router, 2)
    logits = np.asarray(h, np.float64) @ np.asarray(w.router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[..., :2]
    fraction = np.array([(top2 == e).sum() for e in range(E)]) / top2.size
    aux = E * np.sum(fraction * probs.mean(axis=(0, 1)))
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_array_equal(np.asarray(routing.expert_BxLxR), top2)
    np.testing.assert_allclose(float(routing.aux_loss), aux, rtol=1e-5)
    np.testing.assert_allclose(float(routing.z_loss), z, rtol=1e-5)
    # A router that cannot prefer anything: uniform probabilities, loss exactly 1, z-loss log(E)^2.
    uniform = jax.jit(route, static_argnums=2)(h, jnp.zeros((D, E)), 1)
    np.testing.assert_allclose(float(uniform.aux_loss), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(uniform.z_loss), np.log(E) ** 2, rtol=1e-6)


def test_all_to_all_bytes_match_the_buffer_formula():
    """Forward: two all-to-alls of the [E, G, C, D] buffer per layer; forward + backward: four."""
    mesh = expert_mesh()
    shard = ActivationSharding(preset_rules("dp"), mesh)
    h, w, probe = place(*layer_inputs(), mesh)
    cf = 1.25
    buffer = dispatch_buffer_bytes(B // 8, L, E, 2, cf, 4, D)
    assert buffer == E * 1 * capacity(L, E, 2, cf) * D * 4
    sent = (4 - 1) / 4 * buffer  # the share of the buffer that leaves each device (expert axis of 4)

    def forward(h, w):
        return moe_mlp(h, w, top_k=2, capacity_factor=cf, dispatch=expert_dispatch(shard))[0]

    def loss(h, w, probe):
        return jnp.sum(forward(h, w) * probe)

    with jax.set_mesh(mesh):
        fwd = [c for c in hlo.collectives(hlo.compiled_text(forward, h, w)) if c.kind == "all-to-all"]
        both = [
            c
            for c in hlo.collectives(hlo.compiled_text(jax.grad(loss, argnums=(0, 1)), h, w, probe))
            if c.kind == "all-to-all"
        ]
    for found, copies in ((fwd, 2), (both, 4)):
        assert all(c.group_size == 4 for c in found), [c.group_size for c in found]
        wire = sum(c.wire_bytes * c.executions for c in found)
        assert copies * sent <= wire <= 1.05 * copies * sent, (wire, copies * sent, found)


def moe_config(run_dir="runs/test-moe", **overrides):
    cfg = tiny_config(run_dir, **overrides)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"moe": cfg.model.moe.model_validate(MOE)})})


def run_steps(cfg, mesh, steps=3):
    run = setup_training(cfg, mesh)
    loader = run.loader(load_token_splits(cfg.data)[0], seed=cfg.seed)
    params, opt_state = run.init_state()
    losses, metrics = [], []
    for _ in range(steps):
        params, opt_state, m = run.train_step(params, opt_state, loader.next())
        losses.append(float(m["loss"]))
        metrics.append({k: float(v) for k, v in m.items()})
    loss, grads = run.grads(params, loader.next())
    return run, np.array(losses), metrics, float(loss), jax.device_get(grads)


@functools.cache
def sharded_run():
    return run_steps(moe_config(), expert_mesh())


@functools.cache
def reference_run():
    return run_steps(moe_config(), mesh_of(devices=1))


@pytest.mark.parametrize("case", ["dp", "fsdp_tp"])
def test_moe_model_on_expert_mesh_matches_one_device(case):
    """Whole model, 3 steps vs 1 device: losses, MoE metrics and gradients within 1e-5.

    dp on data 2 x expert 4; fsdp_tp on data 2 x expert 2 x model 2 (expert
    weights gathered over data, their hidden dim split over model). Capacity
    groups are rows, so the comparison holds with tokens dropped too.
    """
    if case == "dp":
        _, losses, metrics, loss, grads = sharded_run()
    else:
        _, losses, metrics, loss, grads = run_steps(moe_config(sharding="fsdp_tp"), mesh_of(data=2, expert=2, model=2))
    _, ref_losses, ref_metrics, ref_loss, ref_grads = reference_run()
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOLERANCE)
    assert abs(loss - ref_loss) <= TOLERANCE
    for m, m_ref in zip(metrics, ref_metrics, strict=True):
        assert set(m) >= {"moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"}
        for key in m:
            assert abs(m[key] - m_ref[key]) <= TOLERANCE, key
    assert any(m["moe_dropped_fraction"] > 0 for m in metrics), "capacity 1.5 should drop something here"
    assert any("moe" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0])
    assert_trees_close(grads, ref_grads, rel=TOLERANCE, what="gradient")


def test_training_on_expert_mesh_lowers_the_loss_and_logs_moe_metrics(tmp_path):
    run = sharded_run()[0]
    cfg = moe_config(str(tmp_path / "run"))
    cfg = cfg.model_copy(update={"steps": run.cfg.steps})
    result = train(cfg, expert_mesh(), progress=False, log=lambda _: None, setup=run)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.1, result.losses
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(0 <= r["moe_dropped_fraction"] < 1 and r["moe_aux_loss"] > 0 for r in train_rows)


def test_moe_parameters_are_sharded_over_expert():
    run = sharded_run()[0]
    rows = {
        r.path: r for r in describe(run.model.params, run.model.logical_axes, preset_rules("dp"), expert_mesh()).rows
    }
    assert rows["moe/gate"].shape == (1, E, 32, 32) and rows["moe/gate"].spec == P(None, "expert", None, None)
    assert rows["moe/down"].spec == P(None, "expert", None, None)
    assert rows["moe/router"].spec == P(None, None, None)
    assert rows["layers/gate_up"].shape[0] == 1  # one dense MLP of the two layers
    tp = describe(run.model.params, run.model.logical_axes, preset_rules("tp"), mesh_of(expert=4, model=2))
    assert {r.path: r.spec for r in tp.rows}["moe/up"] == P(None, "expert", None, "model")


def test_unsupported_combinations_are_refused():
    interleaved = moe_config(model={"n_layers": 4}, pipeline={"schedule": "interleaved-1f1b", "virtual_stages": 2})
    with pytest.raises(ValueError, match=r"virtual_stages=2 does not combine with model.moe.n_experts=8: two or more"):
        setup_training(interleaved, mesh_of(data=4, pipe=2))
    v_shape = moe_config(model={"n_layers": 4}, pipeline={"schedule": "zb-v", "virtual_stages": 2})
    with pytest.raises(ValueError, match=r"\(zb-v\) does not combine with model.moe.n_experts=8: two or more"):
        setup_training(v_shape, mesh_of(data=4, pipe=2))
    with pytest.raises(ValueError, match="does not combine with grad_compression=bf16"):
        setup_training(moe_config(grad_compression="bf16"), expert_mesh())
    two_experts = moe_config()
    two_experts = two_experts.model_copy(
        update={
            "model": two_experts.model.model_copy(
                update={"moe": two_experts.model.moe.model_copy(update={"n_experts": 2})}
            )
        }
    )
    with pytest.raises(ValueError, match="expert"):  # 2 experts cannot split over 4 devices
        setup_training(two_experts, expert_mesh())


def test_config_errors_name_the_culprit():
    with pytest.raises(ConfigError, match="moe.period"):
        tiny_config(model={"n_layers": 3, "moe": {"n_experts": 4}})
    with pytest.raises(ConfigError, match="top_k"):
        tiny_config(model={"moe": {"n_experts": 1, "top_k": 2}})
    dense = tiny_config()
    assert dense.model.n_moe_layers == 0
    moe = moe_config().model
    # 2 layers, 1 MoE: its dense MLP (3*32*64) becomes a router (32*8) and 8 experts of 3*32*32.
    assert moe.num_params() - dense.model.num_params() == 32 * 8 + 8 * 3 * 32 * 32 - 3 * 32 * 64
    # FLOPs count the experts a token uses (top 2 of 8), not all of them.
    extra_flops = moe.flops_per_token(16) - dense.model.flops_per_token(16)
    assert extra_flops == 6 * (32 * 8 + 2 * 3 * 32 * 32 - 3 * 32 * 64)


def test_report_predicts_the_moe_step_traffic():
    """shardlib.analysis.report on the MoE step under tp (expert 4 x model 2): all-to-alls and the experts' tensor psums.

    The expert axis is the only token axis here, so its ratio also checks that
    the experts' gradients are not reduced over it (each device owns its experts).
    """
    cfg, mesh = moe_config(sharding="tp"), mesh_of(expert=4, model=2)
    layout = resolve_layout(cfg, dict(mesh.shape))
    measured = measure(cfg, mesh)
    report = build_report(layout, measured=measured)

    def total(found):
        return sum(c.total_wire_bytes for c in found)

    sent = total(c for c in measured.collectives if c.kind == "all-to-all" and c.axes == ("expert",))
    predicted = sum(t.wire_bytes for t in report.terms if t.strategy == "experts")
    assert predicted > 0 and sent == pytest.approx(predicted, rel=0.05)
    summed = total(c for c in measured.collectives if c.axes == ("model",) and "shard_map/psum" in c.op_name)
    predicted = sum(t.wire_bytes for t in report.terms if t.what.startswith("expert outputs"))
    assert predicted > 0 and summed == pytest.approx(predicted, rel=0.05)
    (expert,) = [a for a in report.axes if a.axis == "expert"]
    assert expert.ratio == pytest.approx(1.0, abs=0.05)
