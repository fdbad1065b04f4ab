"""optimizer_shardings for any optax chain: each sharded under fsdp and tp, stepped under jit, against one device.

Every case places the optimizer state with the shardings ``optimizer_shardings``
derives (a wrong-rank spec, as Adafactor's factored moments used to get, makes
``jit`` refuse the step), takes two steps with the same jitted function, and
compares parameters, optimizer state and losses per leaf (1e-5 of each leaf's
scale, ``tests.support.assert_trees_close``) with the same two steps on one
device. Two steps, so that ``MultiSteps`` (every 2) applies its accumulated
update. Adam-family optimizers use eps 1e-3 for the reason given in
tests/test_equivalence.py: with eps 1e-8 an element whose gradient is float32
noise moves by up to lr, whatever the sharding.

The model is a two-layer MLP classifier on a tiny batch. Compiling dominates,
so all nine optimizers step side by side in one jitted function per preset and
mesh (three compiles in all); each case's test compares its own leaves.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib import (
    logical_to_sharding,
    optimizer_shardings,
    preset_rules,
    shardings_like_params,
    tree_shardings,
)
from shardlib.core.state_sharding import derived_spec
from tests.support import assert_trees_close, mesh_of

D, F, B = 16, 32, 8
AXES = {"up": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}, "down": {"kernel": ("mlp", "embed")}}
LABELS = {"up": {"kernel": "adam", "bias": "sgd"}, "down": {"kernel": "adam"}}
DECAY = {"up": {"kernel": True, "bias": False}, "down": {"kernel": True}}

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2, eps=1e-3),
    # Factored only above 8 elements per dimension: every kernel here is factored.
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=8),
    "lion": lambda: optax.lion(1e-3),
    "sgd_momentum": lambda: optax.sgd(1e-1, momentum=0.9),
    "multi_transform": lambda: optax.multi_transform(
        {"adam": optax.adam(1e-2, eps=1e-3), "sgd": optax.sgd(1e-1)}, LABELS
    ),
    "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2, eps=1e-3), every_k_schedule=2),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, eps=1e-3),
    "masked": lambda: optax.chain(optax.masked(optax.add_decayed_weights(0.1), DECAY), optax.sgd(1e-1)),
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, eps=1e-3)),
}


def init_params():
    """On the host: placing host arrays compiles nothing (moving device arrays onto a mesh does)."""
    rng = np.random.default_rng(0)
    normal = lambda scale, *shape: (scale * rng.standard_normal(shape)).astype(np.float32)
    return {
        "up": {"kernel": normal(0.3, D, F), "bias": np.full((F,), 0.1, np.float32)},
        "down": {"kernel": normal(0.3, F, D)},
    }


def loss_fn(params, batch):
    x, labels = batch
    h = jax.nn.relu(x @ params["up"]["kernel"] + params["up"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["down"]["kernel"], labels).mean()


def batch():
    x = np.random.default_rng(1).standard_normal((B, D)).astype(np.float32)
    return x, np.arange(B, dtype=np.int32) % D


def run_all(preset: str, mesh):
    """Every optimizer, two jitted steps each from the same start, in one compiled function.

    One jit per mesh and preset rather than one per optimizer: on 2 cores the
    fixed cost of a compile dominates steps this small. Returns, per
    optimizer: (params, opt_state, losses) on the host, the optimizer state
    on the devices, and the shardings ``optimizer_shardings`` gave it.
    """
    rules = preset_rules(preset)
    txs = {name: make() for name, make in OPTIMIZERS.items()}
    params = init_params()
    param_sh = tree_shardings(params, AXES, rules, mesh)
    opt_sh = {name: optimizer_shardings(tx, params, param_sh, mesh) for name, tx in txs.items()}
    data_sh = logical_to_sharding(("batch", "embed"), rules, mesh, shape=(B, D))
    label_sh = logical_to_sharding(("batch",), rules, mesh, shape=(B,))
    opt_state = jax.device_put({name: jax.device_get(tx.init(params)) for name, tx in txs.items()}, opt_sh)
    all_params = jax.device_put({name: params for name in txs}, {name: param_sh for name in txs})
    data = jax.device_put(batch(), (data_sh, label_sh))

    traces = []

    def step(all_params, opt_state, data):
        traces.append(1)  # runs once per trace, not per call
        new_params, new_state, losses = {}, {}, {}
        for name, tx in txs.items():
            losses[name], grads = jax.value_and_grad(loss_fn)(all_params[name], data)
            updates, new_state[name] = tx.update(grads, opt_state[name], all_params[name])
            new_params[name] = optax.apply_updates(all_params[name], updates)
        return new_params, new_state, losses

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        step,
        in_shardings=({name: param_sh for name in txs}, opt_sh, (data_sh, label_sh)),
        out_shardings=({name: param_sh for name in txs}, opt_sh, {name: replicated for name in txs}),
    )
    losses = []
    for _ in range(2):
        all_params, opt_state, loss = jitted(all_params, opt_state, data)
        losses.append(loss)
    assert len(traces) == 1  # one compile for both steps
    host = jax.device_get((all_params, opt_state, losses))
    return {
        name: (
            (host[0][name], host[1][name], [step_losses[name] for step_losses in host[2]]),
            opt_state[name],
            opt_sh[name],
        )
        for name in txs
    }


@pytest.fixture(scope="module")
def meshes():
    return {"one": mesh_of(devices=1), "sharded": mesh_of(data=2, model=2)}


@pytest.fixture(scope="module")
def results(meshes):
    """preset ("one" for one device) -> optimizer -> run_all's result, each computed on first use."""
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = run_all("fsdp", meshes["one"]) if preset == "one" else run_all(preset, meshes["sharded"])
        return cache[preset]

    return get


def specs(shardings):
    return [s.spec for s in jax.tree.leaves(shardings)]


@pytest.mark.parametrize("preset", ["fsdp", "tp"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_sharded_matches_one_device(name, preset, results):
    got, opt_state, opt_sh = results(preset)[name]
    want = results("one")[name][0]
    assert_trees_close(got, want, rel=1e-5, floor=1e-9, what=f"{name}/{preset}")
    # The state lives where optimizer_shardings said: no leaf was left for jit to choose.
    for leaf, sharding in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_sh), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (name, leaf.shape, sharding)
    # Something is split: the test would pass vacuously on replicated state.
    split_axis = "data" if preset == "fsdp" else "model"
    if name not in ("masked",):  # sgd alone keeps no per-parameter state
        assert any(split_axis in str(s) for s in specs(opt_sh)), specs(opt_sh)


def test_adafactor_factored_moments_get_the_rank_of_their_leaf(meshes):
    mesh = meshes["sharded"]
    params = init_params()
    tx = OPTIMIZERS["adafactor"]()
    param_sh = tree_shardings(params, AXES, preset_rules("fsdp_tp"), mesh)
    [factored] = [
        s
        for s in jax.tree.leaves(optimizer_shardings(tx, params, param_sh, mesh), is_leaf=lambda x: hasattr(x, "v_row"))
        if hasattr(s, "v_row")
    ]
    # up/kernel [16, 32] is P("data", "model"): its row statistic [16] follows dim 0, the column [32] dim 1.
    assert param_sh["up"]["kernel"].spec == P("data", "model")
    assert factored.v_row["up"]["kernel"].spec == P("data")
    assert factored.v_col["up"]["kernel"].spec == P("model")
    assert factored.v["up"]["kernel"].spec == P(None)  # a [1] placeholder for factored leaves
    assert factored.v["up"]["bias"] == param_sh["up"]["bias"]  # unfactored: the parameter's own
    assert factored.count.spec == P()


def test_masked_nodes_keep_their_place(meshes):
    mesh = meshes["sharded"]
    params = init_params()
    tx = OPTIMIZERS["multi_transform"]()
    param_sh = tree_shardings(params, AXES, preset_rules("tp"), mesh)
    shardings = optimizer_shardings(tx, params, param_sh, mesh)
    structure = jax.tree.structure(jax.eval_shape(tx.init, params))
    assert jax.tree.structure(shardings) == structure  # MaskedNode placeholders where optax has them
    adam_mu = shardings.inner_states["adam"].inner_state[0].mu
    assert isinstance(adam_mu["up"]["bias"], optax.MaskedNode)
    assert adam_mu["up"]["kernel"] == param_sh["up"]["kernel"]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((16, 32), P("data", "model")),
        ((16,), P("data")),
        ((32,), P("model")),
        ((1,), P(None)),
        ((), P()),
        ((16, 1), P("data", None)),
        ((7,), P()),  # lines up with nothing: replicated
        ((32, 16), P()),  # the dimensions out of order do not line up
    ],
)
def test_derived_spec(shape, expected):
    assert derived_spec(shape, (16, 32), P("data", "model")) == expected


def test_derived_spec_of_a_spec_shorter_than_the_rank():
    assert derived_spec((32,), (16, 32), P("data")) == P(None)


def test_shardings_like_params_name_the_missing_parameter(meshes):
    from shardlib import ShardingError

    mesh = meshes["one"]
    params = {"w": np.zeros((4,)), "b": np.zeros((2,))}
    with pytest.raises(ShardingError) as err:
        shardings_like_params({}, params, {"w": NamedSharding(mesh, P())}, mesh)
    assert str(err.value) == (
        "param_shardings has nothing for parameter b; it must give a jax Sharding per parameter "
        "(tree_shardings(params, axes, rules, mesh))"
    )
