"""The public per-use reduction on models shardlib did not write.

* ``LinenReduction`` (an ``nn.intercept_methods`` interceptor) on a small Linen model with
  ``nn.Embed``, ``nn.Dense`` (with a bias), ``nn.DenseGeneral`` and a LayerNorm, its layers
  under ``nn.scan``: under fsdp, tp and hsdp its gradients equal one device's, and every
  weight gradient leaves its use in one reduce-scatter over the axes the weight is sharded
  over and one all-reduce over the other token axes, never an all-reduce that is only sliced;
* what it leaves to the partitioner it says (or refuses, ``strict``), and bad input is named;
* ``reduced_weight_use`` / ``use_specs`` / ``reduce_deferred_params`` on a table of uses of the
  caller's own, stacked weights and a deferred reduction included.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlib
from shardlib.analysis.report.collectives import find_collectives
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.core.rules import ShardingError
from shardlib.parallel.reduced_dense import LinenReduction
from shardlib.parallel.reduction import reduce_deferred_params, reduced_weight_use, use_specs
from shardlib.parallel.weight_use import PlainWeightUse, WeightUseSpec
from tests.support import assert_trees_close, mesh_of

lp = nn.with_logical_partitioning
INIT = nn.initializers.lecun_normal()
VOCAB, D, F = 32, 16, 32


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(
            name="norm", scale_init=lp(nn.initializers.ones, ("embed",)), bias_init=lp(nn.zeros, ("embed",))
        )(x)
        q = nn.DenseGeneral((2, 8), use_bias=False, name="q", kernel_init=lp(INIT, ("embed", "heads", "head_dim")))(h)
        x = x + nn.DenseGeneral(
            D, axis=(-2, -1), use_bias=False, name="o", kernel_init=lp(INIT, ("heads", "head_dim", "embed"))
        )(jnp.tanh(q))
        up = nn.Dense(
            F, name="up", kernel_init=lp(INIT, ("embed", "mlp")), bias_init=lp(nn.initializers.normal(0.1), ("mlp",))
        )
        return x + nn.Dense(D, use_bias=False, name="down", kernel_init=lp(INIT, ("mlp", "embed")))(
            nn.gelu(up(x))
        ), None


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="embed", embedding_init=lp(nn.initializers.normal(0.5), ("vocab", "embed")))(ids)
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(VOCAB, use_bias=False, name="head", kernel_init=lp(INIT, ("embed", "vocab")))(x)


MODEL = TinyLM()


def _loss(params, ids, reduction=None):
    if reduction is None:
        return jnp.mean(jnp.sin(MODEL.apply(params, ids)) ** 2)
    with nn.intercept_methods(reduction):
        return jnp.mean(jnp.sin(MODEL.apply(params, ids)) ** 2)


@pytest.fixture(scope="module")
def setup():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (16, 8)), jnp.int32)  # 16 tokens a device on 8
    boxed = jax.eval_shape(MODEL.init, jax.random.key(0), ids)
    params = shardlib.unbox(MODEL.init(jax.random.key(0), ids))
    return ids, shardlib.logical_axes(boxed), params, jax.grad(_loss)(params, ids)


# preset, mesh, {(kind, axes)} of the collectives the uses' own shard_maps make
CASES = {
    "fsdp": ("fsdp", {"data": 8}, {("reduce-scatter", ("data",)), ("all-reduce", ("data",))}),  # the bias: replicated
    "tp": ("tp", {"data": 4, "model": 2}, {("all-reduce", ("data",))}),
    "hsdp": (
        "hsdp",
        {"data_replica": 2, "data": 4},
        {("reduce-scatter", ("data",)), ("all-reduce", ("data_replica",)), ("all-reduce", ("data_replica", "data"))},
    ),
}


def _compiled_grad(setup, preset, sizes, reduced=True):
    ids, axes, params, _ = setup
    mesh = mesh_of(**sizes)
    rules = shardlib.preset_rules(preset)
    param_sh = shardlib.tree_shardings(params, axes, rules, mesh)
    ids_sh = shardlib.logical_to_sharding(("batch", "length"), rules, mesh, shape=ids.shape)
    reduction = LinenReduction(shardlib.ActivationSharding(rules, mesh)) if reduced else None
    fn = jax.jit(lambda p, i: jax.grad(_loss)(p, i, reduction), in_shardings=(param_sh, ids_sh), out_shardings=param_sh)
    return fn, mesh, reduction


@pytest.mark.parametrize("case", CASES)
def test_a_linen_models_gradients_match_one_device_and_each_is_reduced_once(case, setup):
    preset, sizes, expected = CASES[case]
    ids, _, params, reference = setup
    fn, mesh, reduction = _compiled_grad(setup, preset, sizes)
    assert_trees_close(fn(params, ids), reference, what=case)
    assert set(reduction.reduced) == {"embed", "head", "layers/q", "layers/o", "layers/up", "layers/down"}
    assert reduction.reduced["layers/up"]["bias"] == (P("model") if preset == "tp" else P(None))
    found = find_collectives(parse_hlo(fn.lower(params, ids).compile().as_text()), dict(mesh.shape))
    uses = [c for c in found if "/use_" in c.op_name and "shard_map" in c.op_name]
    assert {(c.kind, c.axes) for c in uses} == expected, uses
    # Only the LayerNorm's gradients (left to the partitioner; XLA may combine them into a use's
    # all-reduce) are all-reduced and sliced: a layer's scale and bias, 2 x D floats.
    assert all(c.sliced_bytes <= 2 * D * 4 for c in found), [c for c in found if c.sliced]


def test_the_partitioner_alone_moves_more_bytes(setup):
    """The same fsdp step without the interceptor: XLA:CPU all-reduces (and slices) the sharded gradients."""
    ids, _, params, _ = setup

    def data_bytes(reduced):
        fn, mesh, _ = _compiled_grad(setup, "fsdp", {"data": 8}, reduced)
        found = find_collectives(parse_hlo(fn.lower(params, ids).compile().as_text()), dict(mesh.shape))
        return sum(c.per_axis(dict(mesh.shape)).get("data", 0.0) for c in found)

    assert data_bytes(False) > 1.5 * data_bytes(True)


def _traced(reduction, params, ids):
    """Traces the forward pass under ``reduction`` (nothing compiles) and returns it."""
    jax.eval_shape(lambda p: _loss(p, ids, reduction), params)
    return reduction


class Unusual(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, use_bias=False, name="plain")(x)  # no logical axes
        x = nn.Dense(
            D, use_bias=False, name="custom", dot_general=jax.lax.dot_general, kernel_init=lp(INIT, ("embed", "mlp"))
        )(x)
        return x + self.param("offset", lp(nn.initializers.zeros, ("embed",)), (D,))


def test_what_the_interceptor_leaves_to_the_partitioner_it_says_or_refuses_when_strict():
    mesh = mesh_of(data=8)
    shard = shardlib.ActivationSharding(shardlib.preset_rules("fsdp"), mesh)
    model, x = Unusual(), jnp.ones((8, 4, D))
    params = shardlib.unbox(model.init(jax.random.key(0), x))
    reduction = LinenReduction(shard)
    with nn.intercept_methods(reduction):
        jax.eval_shape(model.apply, params, x)
    assert "no logical axes" in reduction.left["plain"]
    assert "dot_general" in reduction.left["custom"]
    assert "offset" in reduction.left["Unusual"]
    assert not reduction.reduced
    assert "plain: left to the partitioner" in reduction.describe()
    with (
        pytest.raises(ValueError, match="Unusual: .*offset.*strict=True refuses"),
        nn.intercept_methods(LinenReduction(shard, strict=True)),
    ):
        jax.eval_shape(model.apply, params, x)


def test_weight_axes_that_do_not_match_the_kernels_rank_are_named(setup):
    ids, axes, params, _ = setup
    mesh = mesh_of(data=8)
    shard = shardlib.ActivationSharding(shardlib.preset_rules("fsdp"), mesh)
    bad = jax.tree.map(lambda a: a, axes, is_leaf=shardlib.is_logical_axes)
    bad["params"]["head"]["kernel"] = ("embed",)  # the kernel is [D, V]
    with pytest.raises(ShardingError, match=r"head/kernel.*2 dimensions"):
        _traced(LinenReduction(shard, param_axes=bad), params, ids)
    # The tree's stacked axes are dropped for a scanned layer: the same specs as the init boxes give.
    from_tree = _traced(LinenReduction(shard, param_axes=axes), params, ids)
    assert from_tree.reduced == _traced(LinenReduction(shard), params, ids).reduced


USES = {
    "w_in": WeightUseSpec(lambda x, w: jnp.einsum("bd,df->bf", x, w), "x", ("batch", "embed"), ("batch", "mlp")),
    "w_out": WeightUseSpec(lambda x, w: jnp.einsum("bf,fd->bd", x, w), "h", ("batch", "mlp"), ("batch", "embed")),
}
PATHS = {"w_in": ("layers", "w_in"), "w_out": ("layers", "w_out")}


def test_reduced_weight_use_on_the_callers_own_table_with_stacked_weights_and_a_deferred_reduction():
    """Two microbatches through a scanned two-weight MLP under fsdp: partial gradients summed, reduced once."""
    mesh = mesh_of(data=8)
    shard = shardlib.ActivationSharding(shardlib.preset_rules("fsdp"), mesh)
    keys = jax.random.split(jax.random.key(1), 3)
    params = {
        "layers": {
            "w_in": jax.random.normal(keys[0], (3, 16, 32)) / 4,
            "w_out": jax.random.normal(keys[1], (3, 32, 16)) / 4,
        }
    }
    xs = jax.random.normal(keys[2], (2, 16, 16))
    param_specs = {"layers": {"w_in": P(None, "data", None), "w_out": P(None, None, "data")}}
    specs = use_specs(param_specs, PATHS, stacked=("layers",))
    assert specs == {"w_in": P("data", None), "w_out": P(None, "data")}
    use = reduced_weight_use(shard, USES, specs, deferred=True)

    def loss(params, x, use):
        def layer(x, w):
            return x + use("w_out", jnp.tanh(use("w_in", x, w["w_in"])), w["w_out"]), None

        return jnp.mean(jax.lax.scan(layer, x, params["layers"])[0] ** 2)

    def two_microbatches(params, xs):
        g = jax.tree.map(jnp.add, *(jax.grad(loss)(params, xs[i], use) for i in range(2)))
        return reduce_deferred_params(g, param_specs, PATHS.values(), use)

    plain = PlainWeightUse(USES)
    reference = jax.tree.map(jnp.add, *(jax.grad(loss)(params, xs[i], plain) for i in range(2)))
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
    got = jax.jit(two_microbatches, in_shardings=(p_sh, NamedSharding(mesh, P(None, "data"))), out_shardings=p_sh)(
        params, xs
    )
    assert_trees_close(got, reference, what="deferred, reduced once")


def test_reduced_weight_use_names_bad_input():
    shard = shardlib.ActivationSharding(shardlib.preset_rules("fsdp"), mesh_of(data=8))
    with pytest.raises(ValueError, match=r"\['w_typo'\] name no use"):
        reduced_weight_use(shard, USES, {"w_typo": P("data", None)})
    use = reduced_weight_use(shard, USES, {"w_in": P(None, "data", None)})  # a stacked spec given whole
    with pytest.raises(ValueError, match=r"'w_in'.*names 3 dimensions.*2-dimensional"):
        jax.eval_shape(lambda x, w: use("w_in", x, w), jnp.ones((16, 16)), jnp.ones((16, 32)))
    one = shardlib.ActivationSharding(shardlib.preset_rules("fsdp"), mesh_of(data=1))
    assert isinstance(reduced_weight_use(one, USES, {"w_in": P()}), PlainWeightUse)  # nothing to reduce over
