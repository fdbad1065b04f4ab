"""Activation constraints for models without hooks, and the opt-in explicit-sharding mesh.

* Linen: ``linen_output_constraints`` through ``nn.intercept_methods``; the
  lowered step carries one sharding constraint per matched module output
  (lowering only, nothing is compiled).
* Explicit axes: ``build_mesh(..., explicit=True)`` and an NNX model that
  passes ``out_sharding=`` (from ``ActivationSharding.spec``) to its layers, as
  models written for explicit sharding do; its loss and gradients on data 2 x
  model 2 match one device.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib import (
    MESH_AXES,
    ActivationSharding,
    ShardingError,
    ShardingWarning,
    build_mesh,
    linen_output_constraints,
    logical_axes,
    mesh_spec,
    preset_rules,
    tree_shardings,
)
from tests.support import assert_trees_close, mesh_of


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="down")(nn.relu(nn.Dense(32, name="up")(x)))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenMLP(name="mlp")(x)


def constraints_in(lowered_text: str) -> list[str]:
    return [
        line.split("<@mesh, ")[1].split(">")[0] for line in lowered_text.splitlines() if "sharding_constraint" in line
    ]


def test_linen_outputs_constrained_by_interceptor():
    mesh = mesh_of(data=2, model=2)
    constrain = linen_output_constraints(
        ActivationSharding(preset_rules("tp"), mesh),
        [("mlp/up$", ("batch", "mlp")), ("mlp/down", None), ("mlp$", ("batch", "embed"))],
    )
    x = jnp.ones((8, 16))
    variables = jax.eval_shape(LinenModel().init, jax.random.key(0), x)

    def apply(variables, x):
        with nn.intercept_methods(constrain):
            return LinenModel().apply(variables, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern matches a module that returns one array
        text = jax.jit(apply).lower(variables, x).as_text()
    assert constraints_in(text) == ['[{"data"}, {"model"}]', '[{"data"}, {}]']  # mlp/up, then mlp; not mlp/down


def test_linen_interceptor_names_a_rank_mismatch():
    constrain = linen_output_constraints(lambda x, axes: x, [("mlp/up$", ("batch", "length", "mlp"))])
    x = jnp.ones((8, 16))
    variables = jax.eval_shape(LinenModel().init, jax.random.key(0), x)
    with pytest.raises(ShardingError) as err, nn.intercept_methods(constrain):
        jax.eval_shape(LinenModel().apply, variables, x)
    assert str(err.value) == (
        "module mlp/up: output of shape (8, 32) but pattern 'mlp/up$' gives logical axes ('batch', 'length', 'mlp')"
    )


class LinenPair(nn.Module):
    """A block that returns (output, auxiliary), as blocks under nn.scan and MoE layers do."""

    @nn.compact
    def __call__(self, x):
        return LinenMLP(name="mlp")(x), jnp.zeros(())


class LinenPairModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        y, aux = LinenPair(name="block")(x)
        return y + aux


def _trace_with(constrain, model):
    x = jnp.ones((8, 16))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with nn.intercept_methods(constrain):
        return jax.eval_shape(model.apply, variables, x)


def test_linen_interceptor_names_a_pattern_that_matches_no_module():
    patterns = [("mlp/up$", ("batch", "mlp")), ("mlp/gate$", ("batch", "mlp"))]
    with pytest.raises(
        ShardingError,
        match=r"pattern\(s\) \['mlp/gate\$'\] match no module.*called: \(the model\), mlp, mlp/up, mlp/down\)",
    ):
        _trace_with(linen_output_constraints(lambda x, axes: x, patterns), LinenModel())
    with pytest.warns(ShardingWarning, match=r"\['mlp/gate\$'\] match no module"):
        _trace_with(linen_output_constraints(lambda x, axes: x, patterns, strict=False), LinenModel())


def test_linen_interceptor_names_a_module_whose_output_is_not_one_array():
    patterns = [("block$", ("batch", "embed")), ("mlp$", ("batch", "embed"))]
    with pytest.raises(ShardingError, match=r"module block returns a tuple.*pattern 'block\$' cannot constrain"):
        _trace_with(linen_output_constraints(lambda x, axes: x, patterns), LinenPairModel())
    with pytest.warns(ShardingWarning, match=r"module block returns a tuple"):
        _trace_with(linen_output_constraints(lambda x, axes: x, patterns, strict=False), LinenPairModel())
    with warnings.catch_warnings():  # None leaves it alone, on purpose
        warnings.simplefilter("error")
        _trace_with(linen_output_constraints(lambda x, axes: x, [("block$", None), *patterns[1:]]), LinenPairModel())


class NNXMLP(nnx.Module):
    """A foreign block with no constraints and no hook for them."""

    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def test_nnx_outputs_constrained_by_a_subclass():
    # NNX has no method interceptor; the README's recipe overrides __call__ in a subclass.
    shard = ActivationSharding(preset_rules("tp"), mesh_of(data=2, model=2))

    class ConstrainedMLP(NNXMLP):
        def __call__(self, x):
            return shard(super().__call__(x), ("batch", "embed"))

    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: ConstrainedMLP(nnx.Rngs(0))))
    text = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, jnp.ones((8, 16))).as_text()
    assert constraints_in(text) == ['[{"data"}, {}]']


# --- explicit axes ----------------------------------------------------------------------------


class ExplicitMLP(nnx.Module):
    """Written for explicit sharding: every contraction says where its output goes."""

    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs, kernel_metadata={"out_sharding": ("embed", "mlp")})
        self.down = nnx.Linear(32, 16, rngs=rngs, kernel_metadata={"out_sharding": ("mlp", "embed")})

    def __call__(self, x, shard: ActivationSharding):
        h = self.up(x, out_sharding=shard.spec((x.shape[0], 32), ("batch", "mlp")))
        y = self.down(jax.nn.relu(h), out_sharding=shard.spec(x.shape, ("batch", "embed")))
        # A change of layout: on Explicit axes ActivationSharding reshards (a constraint would only assert).
        return shard(y, ("batch", "vocab"))


def explicit_loss_and_grads(mesh):
    rules = preset_rules("tp")
    shard = ActivationSharding(rules, mesh)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(ExplicitMLP(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    param_sh = tree_shardings(params, logical_axes(state, [(r"bias$", (None,))]), rules, mesh)
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)

    def loss(params, x):
        model = nnx.merge(graphdef, nnx.State(params))
        return jnp.mean(model(x, shard) ** 2)

    with jax.set_mesh(mesh):
        params = jax.device_put(params, param_sh)
        x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
        return jax.device_get((value, grads)), grads


def test_build_mesh_explicit_is_opt_in():
    assert build_mesh(mesh_spec(data=2), jax.devices()[:2]).axis_types == (AxisType.Auto,) * len(MESH_AXES)
    explicit = build_mesh(mesh_spec(data=2), jax.devices()[:2], explicit=True)
    assert explicit.axis_types == (AxisType.Explicit,) * len(MESH_AXES)


def test_out_sharding_model_on_an_explicit_mesh_matches_one_device():
    sharded = build_mesh(mesh_spec(data=2, model=2), jax.devices()[:4], explicit=True)
    one = build_mesh(mesh_spec(), jax.devices()[:1], explicit=True)
    got, grads = explicit_loss_and_grads(sharded)
    want, _ = explicit_loss_and_grads(one)
    assert_trees_close(got, want, rel=1e-5, what="explicit")
    assert grads["up"]["kernel"].sharding.spec == P(None, "model")  # explicit types keep the parameter's layout
