"""The public expert dispatch (shardlib/parallel/experts.py: ``moe_dispatch``) with an expert that is not SwiGLU.

A GELU MLP with biases, its four weights stacked over experts in a dict,
routed top-2 with capacity factor 1.5 (so pairs are dropped), against a one-device
dense reference written here: every token through its top-k experts, weighted
by the renormalised router probabilities, with the pairs a numpy replay of the
capacity rule drops left out, and the load-balancing and z losses by their
formulas. Output, loss, dropped count and the gradients of the tokens, the
router and every expert weight must agree within 1e-5 of each leaf's scale on
expert 4 x data 2 and on expert 8, from a jitted program and from inside a
``shard_map`` manual over the token axes; bad input gets an error naming it.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.core.rules import preset_rules
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.expert_routing import capacity
from shardlib.parallel.experts import moe_dispatch
from tests.support import assert_trees_close, mesh_of
from tests.test_moe import replay_capacity

TOLERANCE = 1e-5
B, L, D, E, H, TOP_K, CAPACITY_FACTOR = 8, 8, 8, 8, 16, 2, 1.5
AUX_WEIGHT, Z_WEIGHT = 0.1, 0.01
MESHES = {"expert4-data2": {"data": 2, "expert": 4}, "expert8": {"expert": 8}}


def gelu_experts(w, x_ExNxD):
    """Every expert's GELU MLP with biases on its own tokens."""
    h_ExNxH = jnp.einsum("end,edh->enh", x_ExNxD, w["w_in"]) + w["b_in"][:, None, :]
    return jnp.einsum("enh,ehd->end", jax.nn.gelu(h_ExNxH), w["w_out"]) + w["b_out"][:, None, :]


def inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (B, L, D), jnp.float32)
    router = jax.random.normal(ks[1], (D, E), jnp.float32)
    w = {
        "w_in": 0.4 * jax.random.normal(ks[2], (E, D, H), jnp.float32),
        "b_in": 0.1 * jax.random.normal(ks[3], (E, H), jnp.float32),
        "w_out": 0.4 * jax.random.normal(ks[4], (E, H, D), jnp.float32),
        "b_out": 0.1 * jax.random.normal(ks[5], (E, D), jnp.float32),
    }
    probe = jax.random.normal(ks[6], (B, L, D), jnp.float32)
    return x, router, w, probe


def objective(y, stats, probe, total=jnp.sum):
    """A probe of the output plus the router's weighted losses; ``total`` sums the probe's products."""
    return total(y * probe) + AUX_WEIGHT * stats[0] + Z_WEIGHT * stats[1]


def reference_choices(x, router):
    """Each token's top-k experts, best first, on the host."""
    probs = np.asarray(jax.nn.softmax(np.asarray(x, np.float64) @ np.asarray(router, np.float64), axis=-1))
    return np.argsort(-probs, axis=-1)[..., :TOP_K]


def dense_reference(x, router, w, probe, choice_BxLxR, kept_BxLxR):
    """Every expert on every token; each token keeps its top-k outputs that capacity kept, weighted."""
    logits_BxLxE = x @ router
    probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
    top_BxLxR = jnp.take_along_axis(probs_BxLxE, choice_BxLxR, axis=-1)
    weight_BxLxR = top_BxLxR / jnp.sum(top_BxLxR, axis=-1, keepdims=True)
    every_ExBLxD = gelu_experts(w, jnp.broadcast_to(x.reshape(1, B * L, D), (E, B * L, D)))
    every_BxLxExD = every_ExBLxD.reshape(E, B, L, D).transpose(1, 2, 0, 3)
    picked_BxLxRxD = jnp.take_along_axis(every_BxLxExD, choice_BxLxR[..., None], axis=2)
    y = jnp.sum(picked_BxLxRxD * (weight_BxLxR * kept_BxLxR)[..., None], axis=2)
    fraction_E = jnp.stack([jnp.mean(jnp.sum(choice_BxLxR == e, axis=-1)) for e in range(E)]) / TOP_K
    aux = E * jnp.sum(fraction_E * jnp.mean(probs_BxLxE, axis=(0, 1)))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1)))
    return objective(y, (aux, z), probe), (y, aux, z)


@functools.cache
def reference():
    """(loss, (y, aux, z), grads over x, router, w) on one device, and the pairs dropped."""
    x, router, w, probe = inputs()
    choice = reference_choices(x, router)
    kept = replay_capacity(choice, capacity(L, E, TOP_K, CAPACITY_FACTOR), n_experts=E)
    assert 0 < (~kept).sum() < kept.size // 4, "the case must drop some pairs and keep most"
    fn = jax.value_and_grad(dense_reference, argnums=(0, 1, 2), has_aux=True)
    (loss, aux), grads = jax.jit(fn)(x, router, w, probe, jnp.asarray(choice), jnp.asarray(kept, jnp.float32))
    return float(loss), aux, grads, int((~kept).sum())


def sharded_loss(shard, x, router, w, probe, total=jnp.sum):
    y, stats = moe_dispatch(x, x @ router, gelu_experts, w, top_k=TOP_K, capacity_factor=CAPACITY_FACTOR, shard=shard)
    return objective(y, stats, probe, total), (y, stats)


def place(mesh, x, router, w, probe):
    """Tokens over the batch axes (data, expert), experts over `expert`, the router replicated."""
    rows = NamedSharding(mesh, P(("data", "expert")))
    x, probe = jax.device_put((x, probe), rows)
    return (
        x,
        jax.device_put(router, NamedSharding(mesh, P())),
        jax.device_put(w, NamedSharding(mesh, P("expert"))),
        probe,
    )


@functools.cache
def jitted_run(mesh_name):
    mesh = mesh_of(**MESHES[mesh_name])
    shard = ActivationSharding(preset_rules("dp"), mesh)
    fn = jax.value_and_grad(functools.partial(sharded_loss, shard), argnums=(0, 1, 2), has_aux=True)
    with jax.set_mesh(mesh):
        return jax.device_get(jax.jit(fn)(*place(mesh, *inputs())))


@functools.cache
def manual_run(mesh_name):
    """The same call from inside a user's shard_map that made every mesh axis manual."""
    mesh = mesh_of(**MESHES[mesh_name])
    shard = ActivationSharding(preset_rules("dp"), mesh)
    rows, experts = P(("data", "expert")), P("expert")

    def total(a):  # each block holds its rows; the router's losses are already the batch's
        return jax.lax.psum(jnp.sum(a), ("data", "expert"))

    def body(x, router, w, probe):
        return sharded_loss(shard, x, router, w, probe, total)

    inner = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows, P(), experts, rows),
        out_specs=(P(), (rows, P())),
        axis_names={"data", "expert"},
    )
    fn = jax.value_and_grad(inner, argnums=(0, 1, 2), has_aux=True)
    with jax.set_mesh(mesh):
        return jax.device_get(jax.jit(fn)(*place(mesh, *inputs())))


@pytest.mark.parametrize("run", [jitted_run, manual_run], ids=["jitted", "inside-shard_map"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_gelu_experts_match_the_dense_reference(mesh_name, run):
    """Output, losses, dropped pairs and every gradient (tokens, router, each expert weight) within 1e-5."""
    (loss, (y, stats)), grads = run(mesh_name)
    ref_loss, (ref_y, ref_aux, ref_z), ref_grads, ref_dropped = reference()
    assert float(stats.dropped) == ref_dropped
    assert_trees_close(y, ref_y, rel=TOLERANCE, what="output")
    assert_trees_close((stats.aux_loss, stats.z_loss), (ref_aux, ref_z), rel=TOLERANCE, what="router loss")
    assert abs(float(loss) - ref_loss) <= TOLERANCE * abs(ref_loss)
    for path, g_ref in jax.tree_util.tree_flatten_with_path(ref_grads)[0]:
        assert np.abs(g_ref).max() > 1e-3, f"gradient {jax.tree_util.keystr(path)} is trivially small"
    assert_trees_close(grads, ref_grads, rel=TOLERANCE, what="gradient")


def trace(mesh, x, router, w, *, top_k=TOP_K, expert_fn=gelu_experts):
    """Traces one moe_dispatch on ``mesh`` (nothing compiled): where its errors are raised."""
    shard = ActivationSharding(preset_rules("dp"), mesh)

    def layer(x, router, w):
        return moe_dispatch(x, x @ router, expert_fn, w, top_k=top_k, capacity_factor=1.0, shard=shard)

    with jax.set_mesh(mesh):
        return jax.eval_shape(layer, x, router, w)


def test_bad_input_is_refused_naming_it():
    mesh = mesh_of(data=2, expert=4)
    x, router, w, _ = inputs()
    with pytest.raises(ValueError, match=r"top_k=9 must be between 1 and the number of experts \(8\)"):
        trace(mesh, x, router, w, top_k=9)
    six = {k: v[:6] for k, v in w.items()}
    with pytest.raises(ValueError, match=r"\(6,\) has size 6, which does not divide by mesh axes expert=4"):
        trace(mesh, x, router[:, :6], six)
    with pytest.raises(ValueError, match=r"one leading experts dim, got shapes .*\['b_out'\] \(7, 8\)"):
        trace(mesh, x, router, {**w, "b_out": w["b_out"][:7]})
    with pytest.raises(ValueError, match="expert_weights stack 8 experts on their leading dim, but .* have 4 experts"):
        trace(mesh, x, router[:, :4], w)
    with pytest.raises(
        ValueError, match=r"expert_fn must map x_ExNxD \(2, 8, 8\) to y_ExNxD of the same shape, got \(2, 8, 4\)"
    ):
        trace(mesh, x, router, w, expert_fn=lambda w, x: x[..., :4])


def test_inside_a_shard_map_the_expert_axes_must_be_manual():
    mesh = mesh_of(data=2, expert=4)
    shard = ActivationSharding(preset_rules("dp"), mesh)
    x, router, w, _ = inputs()

    def body(x):  # manual over data only: the experts' all-to-all has no axis to run over
        return moe_dispatch(x, x @ router, gelu_experts, w, top_k=2, capacity_factor=1.0, shard=shard)[0]

    inner = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"experts' mesh axes \['expert'\] must be manual"):
        jax.eval_shape(inner, x)


def test_the_dispatch_imports_no_model_or_training_code():
    """shardlib/parallel's layering: the experts' modules bring in neither the model zoo nor training."""
    code = (
        "import sys, shardlib.parallel.experts, shardlib.parallel.expert_routing\n"
        "above = ('shardlib.models', 'shardlib.training', 'shardlib.interop', 'shardlib.analysis', 'shardlib.cluster')\n"
        "print(sorted(m for m in sys.modules if m.startswith(above)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
