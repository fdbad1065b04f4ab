"""T5X-style annotations: ``param_with_axes`` names in the ``params_axes`` collection, read by ``logical_axes``.

The model is written as T5X writes one: plain parameters declared with
``flax.linen.partitioning.param_with_axes``, layers stacked by ``scan_with_axes``
(which adds the ``layers`` name), activations constrained by the same module's
``with_sharding_constraint``. One test compiles a two-layer apply on a 2 x 2 mesh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax.linen import partitioning as nnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from shardlib import (
    ShardingError,
    logical_axes,
    logical_axes_from_state,
    preset_rules,
    tree_shardings,
    tree_specs,
    unbox,
)
from tests.support import assert_trees_close

D, F, VOCAB, LAYERS = 16, 32, 64, 2


class T5XMlpBlock(nn.Module):
    """A pre-scaled residual MLP; ``annotate_bias=False`` declares its bias with plain ``self.param``."""

    annotate_bias: bool = True

    @nn.compact
    def __call__(self, x_BxLxD, _):
        scale = nnp.param_with_axes("scale", nn.initializers.ones, (D,), axes=("embed",))
        wi = nnp.param_with_axes("wi", nn.initializers.lecun_normal(), (D, F), axes=("embed", "mlp"))
        wo = nnp.param_with_axes("wo", nn.initializers.lecun_normal(), (F, D), axes=("mlp", "embed"))
        if self.annotate_bias:
            bias = nnp.param_with_axes("bias", nn.initializers.zeros, (D,), axes=("embed",))
        else:
            bias = self.param("bias", nn.initializers.zeros, (D,))
        h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD * scale, wi)
        h_BxLxF = nnp.with_sharding_constraint(jax.nn.gelu(h_BxLxF), ("batch", "length", "mlp"))
        return x_BxLxD + jnp.einsum("blf,fd->bld", h_BxLxF, wo) + bias, None


class T5XEncoder(nn.Module):
    annotate_bias: bool = True

    @nn.compact
    def __call__(self, tokens_BxL):
        table = nnp.param_with_axes("embedding", nn.initializers.normal(1.0), (VOCAB, D), axes=("vocab", "embed"))
        x_BxLxD = nnp.with_sharding_constraint(table[tokens_BxL], ("batch", "length", "embed"))
        stack = nnp.scan_with_axes(
            T5XMlpBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS, axis_name="layers"
        )
        x_BxLxD, _ = stack(self.annotate_bias, name="layers")(x_BxLxD, None)
        return x_BxLxD @ table.T


TOKENS = jnp.arange(32, dtype=jnp.int32).reshape(4, 8) % VOCAB
PARAM_AXES = {
    "embedding": ("vocab", "embed"),
    "layers": {
        "scale": ("layers", "embed"),
        "wi": ("layers", "embed", "mlp"),
        "wo": ("layers", "mlp", "embed"),
        "bias": ("layers", "embed"),
    },
}


@pytest.fixture(scope="module")
def variables():
    return T5XEncoder().init(jax.random.key(0), TOKENS)


@pytest.fixture(scope="module")
def mesh_and_rules():
    mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    return mesh, preset_rules("fsdp_tp", mesh=mesh, mesh_axes={"data": "fsdp", "model": "tp"})


def test_params_axes_give_the_parameters_their_names_and_specs(variables, mesh_and_rules):
    mesh, rules = mesh_and_rules
    assert set(variables) == {"params", "params_axes"}  # T5X's layout: the names beside the plain parameters
    axes = logical_axes(variables)
    assert axes["params"] == PARAM_AXES
    assert logical_axes_from_state(variables)["params"] == PARAM_AXES
    specs = tree_specs(unbox(variables), axes, rules, mesh)["params"]
    assert specs == {
        "embedding": P("tp", "fsdp"),
        "layers": {
            "scale": P(None, "fsdp"),
            "wi": P(None, "fsdp", "tp"),
            "wo": P(None, "tp", "fsdp"),
            "bias": P(None, "fsdp"),
        },
    }
    # The same names Flax's own reader gives (T5X's get_axis_names, without the _axes suffix).
    flax_names = nnp.get_axis_names(variables["params_axes"])
    assert jax.tree.map(tuple, flax_names, is_leaf=lambda x: isinstance(x, P)) == PARAM_AXES


def test_the_sharded_apply_with_its_own_constraints_matches_one_device(variables, mesh_and_rules):
    """Parameters placed by shardlib's specs, activations constrained by T5X's calls through the same table."""
    mesh, rules = mesh_and_rules
    reference = T5XEncoder().apply(variables, TOKENS)
    shardings = tree_shardings(unbox(variables), logical_axes(variables), rules, mesh)
    placed = jax.device_put(variables, shardings)
    assert placed["params"]["layers"]["wi"].sharding.spec == P(None, "fsdp", "tp")
    with jax.set_mesh(mesh), nnp.axis_rules(rules):  # Flax resolves the module's constraints by the table
        lowered = jax.jit(T5XEncoder().apply).lower(placed, TOKENS)
        logits = lowered.compile()(placed, TOKENS)
    assert "sharding_constraint" in lowered.as_text()  # the constraints are live, not no-ops outside a mesh
    assert_trees_close(logits, reference, rel=1e-5, what="logits")


def test_a_parameter_without_its_axes_entry_is_named():
    variables = jax.eval_shape(T5XEncoder(annotate_bias=False).init, jax.random.key(0), TOKENS)
    assert "bias_axes" not in variables["params_axes"]["layers"]
    with pytest.raises(ShardingError) as err:
        logical_axes(variables)
    message = str(err.value)
    assert message.startswith("params/layers/bias (shape (2, 16)) matches no pattern (no Flax metadata, nor a T5X ")
    assert "<collection>_axes/.../<name>_axes entry either)" in message
    with pytest.raises(ShardingError, match=r"^parameter params/layers/bias has no logical axes \(.*T5X"):
        logical_axes_from_state(variables)
    covered = logical_axes(variables, [(r"layers/bias$", ("layers", "embed"))])
    assert covered["params"] == PARAM_AXES


def test_an_axes_entry_for_no_parameter_or_against_its_box_is_named(variables):
    stale = {**variables, "params_axes": {**variables["params_axes"], "ghost_axes": nnp.AxisMetadata(("embed",))}}
    with pytest.raises(ShardingError, match=r"params_axes/ghost_axes \(for params/ghost\)"):
        logical_axes(stale)
    boxed = {
        "params": {"w": nn.LogicallyPartitioned(jnp.zeros((4, 2)), ("embed", "mlp"))},
        "params_axes": {"w_axes": nnp.AxisMetadata(("mlp", "embed"))},
    }
    with pytest.raises(ShardingError, match=r"params/w: its Flax box names .* but params_axes/w_axes names"):
        logical_axes(boxed)
    misnamed = {"params": {"w": jnp.zeros((4,))}, "params_axes": {"w": nnp.AxisMetadata(("embed",))}}
    with pytest.raises(ShardingError, match=r"^params_axes/w: a T5X axes collection holds"):
        logical_axes(misnamed)
    wrong_rank = {"params": {"w": jnp.zeros((4, 2))}, "params_axes": {"w_axes": nnp.AxisMetadata(("embed",))}}
    with pytest.raises(ShardingError, match=r"^params/w: its Flax metadata names logical axes \('embed',\)"):
        logical_axes(wrong_rank)
