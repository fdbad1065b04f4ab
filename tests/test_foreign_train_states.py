"""train_state_shardings: jit in/out shardings for a flax TrainState, an NNX Optimizer's state and a plain dict.

The three states take one step together in one jitted function (one compile
per mesh), under ``fsdp_tp`` on data 2 x model 2 and on one device; every
leaf must agree within 1e-5 of its scale, parameters and moments must be
split as the rules say, and step counters and RNG keys replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib import ShardingError, logical_axes, preset_rules, train_state_shardings, tree_shardings
from tests.support import assert_trees_close, mesh_of
from tests.test_foreign_optimizers import AXES, batch, init_params, loss_fn

TX = optax.adamw(1e-2, eps=1e-3)  # eps: see tests/test_foreign_optimizers.py


class NNXMLP(nnx.Module):
    """The same MLP as ``loss_fn``'s, in NNX, its axes in metadata."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.up = nnx.Linear(
            16,
            32,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("embed", "mlp")},
            bias_metadata={"out_sharding": ("mlp",)},
        )
        self.down = nnx.Linear(32, 16, use_bias=False, rngs=rngs, kernel_metadata={"out_sharding": ("mlp", "embed")})


def nnx_split():
    """(graphdef, state of (model, optimizer), parameter state), with the host parameters of init_params."""
    with nnx.use_eager_sharding(False):
        model = NNXMLP()
        nnx.update(model, nnx.State(init_params()))
        optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    return graphdef, jax.device_get(state), nnx.state(model, nnx.Param)


def make_states():
    params = init_params()
    flax_state = train_state.TrainState.create(apply_fn=loss_fn, params=params, tx=TX)
    plain = {
        "params": params,
        "opt_state": jax.device_get(TX.init(params)),
        "step": np.int32(0),
        "rng": jax.random.key(7),
    }
    graphdef, nnx_state, _ = nnx_split()
    return graphdef, (jax.device_get(flax_state), plain, nnx_state)


def step_all(graphdef, states, data):
    flax_state, plain, nnx_state = states
    grads = jax.grad(loss_fn)(flax_state.params, data)
    flax_state = flax_state.apply_gradients(grads=grads)

    rng, _ = jax.random.split(plain["rng"])
    grads = jax.grad(loss_fn)(plain["params"], data)
    updates, opt_state = TX.update(grads, plain["opt_state"], plain["params"])
    plain = {
        "params": optax.apply_updates(plain["params"], updates),
        "opt_state": opt_state,
        "step": plain["step"] + 1,
        "rng": rng,
    }

    model, optimizer = nnx.merge(graphdef, nnx_state)
    grads = nnx.grad(lambda m: loss_fn(nnx.to_pure_dict(nnx.state(m, nnx.Param)), data))(model)
    optimizer.update(model, grads)
    return flax_state, plain, nnx.state((model, optimizer))


def run(mesh):
    rules = preset_rules("fsdp_tp")
    graphdef, states = make_states()
    params = init_params()
    param_sh = tree_shardings(params, AXES, rules, mesh)
    shardings = train_state_shardings(states, params, param_sh, mesh)
    data_sh = (NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data")))
    placed = jax.device_put(states, shardings)
    jitted = jax.jit(step_all, static_argnums=0, in_shardings=(shardings, data_sh), out_shardings=shardings)
    out = jitted(graphdef, placed, jax.device_put(batch(), data_sh))
    return out, shardings, param_sh


def host(states):
    """On the host, RNG keys as their raw data (comparable as arrays)."""
    as_data = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return jax.device_get(jax.tree.map(as_data, states))


@pytest.fixture(scope="module")
def sharded():
    return run(mesh_of(data=2, model=2))


def test_every_train_state_matches_one_device(sharded):
    got = host(sharded[0])
    want = host(run(mesh_of(devices=1))[0])
    assert_trees_close(got, want, rel=1e-5, floor=1e-9, what="train state")


def test_parameters_and_moments_are_split_scalars_replicated(sharded):
    (flax_state, plain, nnx_state), _, param_sh = sharded
    kernel = param_sh["up"]["kernel"].spec
    assert kernel == P("data", "model")
    assert flax_state.params["up"]["kernel"].sharding.spec == kernel
    assert flax_state.opt_state[0].mu["up"]["kernel"].sharding.spec == kernel
    assert plain["opt_state"][0].nu["down"]["kernel"].sharding.spec == P("model", "data")
    model_state, optimizer_state = nnx_state[0], nnx_state[1]
    assert model_state["up"]["kernel"][...].sharding.spec == kernel
    assert optimizer_state["opt_state"][0]["mu"]["up"]["kernel"][...].sharding.spec == kernel
    for scalar in (flax_state.step, plain["step"], plain["rng"], optimizer_state["step"][...]):
        assert scalar.sharding.spec == P()
    assert int(flax_state.step) == int(plain["step"]) == int(optimizer_state["step"][...]) == 1


def test_nnx_parameter_state_gives_the_param_shardings():
    # The parameter tree may be the model's nnx.State itself (paths without /value).
    mesh = mesh_of(data=2, model=2)
    _, state, param_state = nnx_split()
    param_sh = tree_shardings(nnx.to_pure_dict(param_state), logical_axes(param_state), preset_rules("tp"), mesh)
    shardings = train_state_shardings(state, param_state, param_sh, mesh)
    assert shardings[1]["opt_state"][0]["nu"]["down"]["kernel"].get_value().spec == P("model", None)


def test_tree_shardings_on_a_train_state_says_what_to_use():
    params = init_params()
    state = {"params": params, "step": np.int32(0)}
    with pytest.raises(ShardingError) as err:
        tree_shardings(state, {"params": AXES}, preset_rules("tp"), mesh_of(devices=1))
    assert str(err.value) == (
        "the logical-axes tree does not have the parameter tree's structure (leaves without logical axes: step). "
        "For a train or optimizer state (steps, counts, moments) use train_state_shardings / "
        "optimizer_shardings, which follow the parameters"
    )
