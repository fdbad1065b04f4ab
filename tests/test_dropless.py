"""Dropless experts (shardlib/parallel/dropless_experts.py, ``model.moe.dispatch: dropless``).

The layer on data 2 x expert 4, by both transports (the ragged all-to-all
through a stand-in built of all-gathers, since XLA:CPU has none), against the
dense reference of tests/test_moe.py, with a capacity and routing under
which the capacity dispatch drops pairs; the whole model through the train
step (grad_accum 2) on the expert mesh against one device; the transport's
automatic choice and ``describe``'s line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.core.rules import preset_rules
from shardlib.core.sharding import ActivationSharding
from shardlib.models.moe import MoEWeights, moe_mlp
from shardlib.parallel.dropless_experts import (
    DroplessDispatch,
    choose_transport,
    dropless_bytes,
    dropless_dispatch,
)
from shardlib.parallel.experts import expert_dispatch
from shardlib.training.setup import setup_training
from tests.support import assert_trees_close, mesh_of, tiny_config
from tests.test_moe import E, dense_reference, expert_mesh, layer_inputs, place

TOLERANCE = 1e-5
SKEWED = 0.5  # a capacity factor under which the skewed router below overflows its favourite experts


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all``'s contract built of all-gathers (XLA:CPU has no ragged-all-to-all):
    sender s's rows [input_offsets_s[me], + send_sizes_s[me]) land at output_offsets_s[me] here."""
    del recv_sizes  # implied by the senders' sizes
    ops_SxMxD, in_off_SxX, sizes_SxX, out_off_SxX = (
        jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)
    )
    me = jax.lax.axis_index(axis_name)
    senders, rows = ops_SxMxD.shape[0], ops_SxMxD.shape[1]
    r_R = jnp.arange(output.shape[0])
    start_Sx1, size_Sx1 = out_off_SxX[:, me][:, None], sizes_SxX[:, me][:, None]
    inside_SxR = (r_R >= start_Sx1) & (r_R < start_Sx1 + size_Sx1)
    source_SxR = jnp.clip(in_off_SxX[:, me][:, None] + r_R - start_Sx1, 0, rows - 1)
    picked_SxRxD = ops_SxMxD[jnp.arange(senders)[:, None], source_SxR]
    received_RxD = jnp.sum(jnp.where(inside_SxR[..., None], picked_SxRxD, 0), axis=0)
    return jnp.where(jnp.any(inside_SxR, axis=0)[:, None], received_RxD, output)


def skew(w: MoEWeights) -> MoEWeights:
    """A router that favours experts 0 and 1 for every token: capacity drops pairs there."""
    return w._replace(router=w.router.at[:, :2].add(3.0))


@functools.cache
def layer_results(kind: str):
    """(output, dropped, gradients of (h, w)) of one MoE layer (skewed router, top 2, capacity SKEWED):
    ``reference`` dense on one device; ``capacity``; ``all_gather``, ``ragged`` (stand-in) dropless."""
    h, w, probe = layer_inputs()
    w = skew(w)
    if kind == "reference":

        def loss(h, w, probe):
            y = dense_reference(h, w, 2)
            return jnp.sum(y * probe), (y, jnp.zeros(()))

        (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w, probe)
        return y, float(dropped), grads
    mesh = expert_mesh()
    shard = ActivationSharding(preset_rules("dp"), mesh)
    dispatch = {
        "capacity": lambda: expert_dispatch(shard),
        "all_gather": lambda: DroplessDispatch(shard, "all_gather"),
        "ragged": lambda: DroplessDispatch(shard, "ragged_all_to_all", exchange=emulated_ragged_all_to_all),
    }[kind]()
    h, w, probe = place(h, w, probe, mesh)

    def sharded(h, w, probe):
        y, stats = moe_mlp(h, w, top_k=2, capacity_factor=SKEWED, dispatch=dispatch)
        return jnp.sum(y * probe), (y, stats.dropped)

    with jax.set_mesh(mesh):
        (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(h, w, probe)
    return jax.device_get(y), float(dropped), jax.device_get(grads)


@pytest.mark.parametrize("transport", ["all_gather", "ragged"])
def test_dropless_layer_matches_the_dense_reference_where_capacity_drops(transport):
    """Skewed routing at capacity factor 0.5: the capacity dispatch drops pairs and is off the reference;
    dropless (either transport) drops none, and its output and every gradient are within 1e-5."""
    y_ref, _, grads_ref = layer_results("reference")
    y_cap, dropped_cap, _ = layer_results("capacity")
    assert dropped_cap > 0.2 * 8 * 8 * 2, "the case must make the capacity dispatch drop many pairs"
    assert np.abs(y_cap - y_ref).max() > 0.1 * np.abs(y_ref).max(), "capacity's drops must show in its output"
    y, dropped, grads = layer_results(transport)
    assert dropped == 0
    assert_trees_close(y, y_ref, rel=TOLERANCE, what="output")
    assert_trees_close(grads, grads_ref, rel=TOLERANCE, what="gradient")


def test_transport_is_chosen_by_backend_and_can_be_forced():
    assert choose_transport("cpu") == "all_gather"  # XLA:CPU: HLO opcode ragged-all-to-all is not supported
    assert choose_transport("gpu") == "ragged_all_to_all" and choose_transport("tpu") == "ragged_all_to_all"
    assert choose_transport("cpu", "ragged_all_to_all") == "ragged_all_to_all"
    assert choose_transport("gpu", "all_gather") == "all_gather"
    with pytest.raises(ValueError, match="dropless_transport='ragged'.*auto, ragged_all_to_all or all_gather"):
        choose_transport("cpu", "ragged")
    assert dropless_dispatch(ActivationSharding(preset_rules("dp"), expert_mesh())).transport == "all_gather"


def test_ragged_path_lowers_with_its_gradient():
    """The real ``ragged_all_to_all`` (and its transpose) traces and lowers here; only XLA:CPU's compiler lacks it."""
    mesh = expert_mesh()
    shard = ActivationSharding(preset_rules("dp"), mesh)
    h, w, probe = place(*layer_inputs(), mesh)
    dispatch = DroplessDispatch(shard, "ragged_all_to_all")

    def loss(h, w, probe):
        return jnp.sum(moe_mlp(h, w, top_k=2, capacity_factor=1.0, dispatch=dispatch)[0] * probe)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, probe).as_text()
    assert text.count("ragged_all_to_all") >= 4  # dispatch and combine, forward and backward


def test_dropless_bytes_against_each_other():
    """The fallback gathers T rows where the ragged path sends T*k copies: equal bytes at k=2 over 2 devices."""
    figures = dropless_bytes(tokens_per_device=64, top_k=2, d=16, itemsize=4, ep_size=2)
    ragged, gather = figures["ragged_all_to_all"], figures["all_gather"]
    assert ragged["wire_bytes"] == 2 * 64 * 2 * 64 // 2
    assert gather["wire_bytes"] == 2 * 64 * 64 + 64 * 2 * 8
    assert ragged["buffer_bytes"] == gather["buffer_bytes"] == 2 * 64 * 2 * 64


# The whole model through the train step: grad_accum 2, data 2 x expert 4, capacity factor 0.5 (the
# capacity dispatch drops there), vocabulary 256 > the 16 tokens a device holds per microbatch.
MOE = {"n_experts": E, "top_k": 2, "capacity_factor": SKEWED, "period": 2, "expert_d_ff": 32}
SGD_LR = 2.0**16  # as tests/test_compat.py: the update swamps the parameters' rounding


def model_config(dispatch: str, **overrides):
    return tiny_config(
        model={"moe": {**MOE, "dispatch": dispatch}}, grad_accum=2, batch_size=16, seq_len=16, **overrides
    )


def batch(vocab: int):
    tokens = np.random.default_rng(0).integers(0, vocab, (16, 17), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@functools.cache
def train_step_outputs(dispatch: str, devices: str):
    """(loss, the gradients one SGD train step applied, its metrics) from fresh parameters."""
    cfg = model_config(dispatch)
    mesh = expert_mesh() if devices == "expert" else mesh_of(devices=1)
    run = setup_training(cfg, mesh, optimizer=optax.sgd(SGD_LR))
    params, opt_state = run.init_state()
    placed = {k: jax.device_put(v, run.batch_sharding) for k, v in batch(cfg.model.vocab_size).items()}
    before = jax.device_get(params)
    after, _, metrics = run.train_step(params, opt_state, placed)
    after, metrics = jax.device_get((after, metrics))
    grads = jax.tree.map(lambda b, a: (np.asarray(b, np.float64) - np.asarray(a, np.float64)) / SGD_LR, before, after)
    return float(metrics["loss"]), grads, {k: float(v) for k, v in metrics.items()}


def test_dropless_model_on_the_expert_mesh_matches_one_device():
    """Loss, MoE metrics and every gradient of the train step within 1e-5 of one device; nothing
    dropped, where the capacity dispatch of the same config drops pairs."""
    loss, grads, metrics = train_step_outputs("dropless", "expert")
    ref_loss, ref_grads, ref_metrics = train_step_outputs("dropless", "one")
    assert abs(loss - ref_loss) <= TOLERANCE, (loss, ref_loss)
    assert metrics["moe_dropped_fraction"] == 0 == ref_metrics["moe_dropped_fraction"]
    for key in ("moe_aux_loss", "moe_z_loss"):
        assert abs(metrics[key] - ref_metrics[key]) <= TOLERANCE, key
    assert_trees_close(grads, ref_grads, rel=TOLERANCE, what="gradient")
    capacity = train_step_outputs("capacity", "one")[2]
    assert capacity["moe_dropped_fraction"] > 0.05, "the capacity dispatch must drop here"


def test_a_capacity_dispatch_is_refused_by_a_dropless_model():
    cfg = model_config("dropless")
    run = setup_training(cfg, mesh_of(devices=1))
    assert run.plan.experts is not None and run.plan.experts.dropless
    shard = ActivationSharding(preset_rules("dp"), expert_mesh())
    from shardlib.models.moe import checked_dispatch

    with pytest.raises(ValueError, match="model.moe.dispatch=dropless but the layer was given a capacity"):
        checked_dispatch(expert_dispatch(shard), "dropless")


def test_tensor_parallel_experts_drop_nothing_and_match():
    """tp on expert 2 x model 2: the experts' hidden dim split over model, partial sums added, as capacity's."""
    h, w, probe = layer_inputs()
    w = skew(w)
    mesh = mesh_of(expert=2, model=2)
    shard = ActivationSharding(preset_rules("tp"), mesh)
    rows = NamedSharding(mesh, P("expert"))
    experts = jax.tree.map(
        lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec)),
        w.experts,
        type(w.experts)(P("expert", None, "model"), P("expert", None, "model"), P("expert", "model", None)),
    )
    placed = (jax.device_put(h, rows), w._replace(experts=experts), jax.device_put(probe, rows))
    dispatch = dropless_dispatch(shard)

    def sharded(h, w, probe):
        return jnp.sum(moe_mlp(h, w, top_k=2, capacity_factor=SKEWED, dispatch=dispatch)[0] * probe)

    with jax.set_mesh(mesh):
        grads = jax.device_get(jax.jit(jax.grad(sharded, argnums=(0, 1)))(*placed))
    assert_trees_close(grads, layer_results("reference")[2], rel=TOLERANCE, what="gradient")


def test_report_predicts_the_dropless_step_traffic():
    """shardlib.analysis.report on the dropless step (dp, data 2 x expert 4, XLA:CPU: the all-gather
    transport): the expert axis's gathers and reduce-scatters against the compiled step's."""
    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.analysis.report.measure import measure
    from shardlib.analysis.report.report import build_report

    cfg, mesh = tiny_config(model={"moe": {**MOE, "dispatch": "dropless"}}), expert_mesh()
    measured = measure(cfg, mesh)
    report = build_report(resolve_layout(cfg, dict(mesh.shape)), measured=measured)
    for kind in ("all-gather", "reduce-scatter"):
        sent = sum(c.total_wire_bytes for c in measured.collectives if c.kind == kind and c.axes == ("expert",))
        predicted = sum(t.wire_bytes for t in report.terms if t.strategy == "experts" and t.kind == kind)
        assert predicted > 0 and sent == pytest.approx(predicted, rel=0.05), kind
    assert not [c for c in measured.collectives if c.kind == "all-to-all" and c.axes == ("expert",)]


def test_another_projects_layer_through_dropless_moe_dispatch():
    """The public sibling of ``moe_dispatch``: a linear expert per ``jax.lax.ragged_dot``, on the expert
    mesh, against every token through its top-2 experts computed densely here."""
    from shardlib.parallel.dropless_experts import dropless_moe_dispatch

    h, w, _ = layer_inputs(3)
    w_ExDxD = w.experts.gate[..., : h.shape[-1]]
    mesh = expert_mesh()
    shard = ActivationSharding(preset_rules("dp"), mesh)
    logits = h @ w.router

    def linear(w_ExDxD, x_MxD, sizes_E):
        return jax.lax.ragged_dot(x_MxD, w_ExDxD, sizes_E)

    rows = NamedSharding(mesh, P(("data", "expert")))
    args = (jax.device_put(h, rows), jax.device_put(logits, rows))
    with jax.set_mesh(mesh):
        run = jax.jit(lambda h, lg, w: dropless_moe_dispatch(h, lg, linear, w, top_k=2, shard=shard))
        y, stats = run(*args, jax.device_put(w_ExDxD, NamedSharding(mesh, P("expert"))))
    probs = jax.nn.softmax(logits, axis=-1)
    top_BxLx2, idx_BxLx2 = jax.lax.top_k(probs, 2)
    every_BxLxExD = jnp.einsum("bld,edf->blef", h, w_ExDxD)
    picked = jnp.take_along_axis(every_BxLxExD, idx_BxLx2[..., None], axis=2)
    expected = jnp.sum(picked * (top_BxLx2 / top_BxLx2.sum(-1, keepdims=True))[..., None], axis=2)
    assert float(stats.dropped) == 0
    assert_trees_close(jax.device_get(y), expected, rel=TOLERANCE, what="output")
