"""Tests for shardlib.core.sharding (rules applied to pytrees) and shardlib.analysis.describe.

Everything runs on the 8 emulated CPU devices from conftest.py, as a data=4 x model=2 mesh.
Arrays are tiny and only a handful of functions are compiled.
"""

from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.analysis.describe import describe, golden_table
from shardlib.core.mesh import build_mesh, mesh_spec
from shardlib.core.rules import ShardingError, preset_rules
from shardlib.core.sharding import (
    ActivationSharding,
    logical_axes_from_state,
    match_logical_axes,
    optimizer_shardings,
    path_str,
    shard_tree,
    tree_shardings,
    tree_specs,
)


@pytest.fixture(scope="module")
def mesh():
    return build_mesh(mesh_spec(data=4, model=2))


def padded(spec: P, ndim: int) -> P:
    """``spec`` with trailing Nones up to ``ndim``: JAX drops them in output shardings."""
    return P(*spec, *([None] * (ndim - len(spec))))


def specs_of(tree):
    return jax.tree.map(lambda a: a.sharding.spec, tree)


# --- path_str ---------------------------------------------------------------------------------


def test_path_str_of_jax_key_paths():
    Pair = namedtuple("Pair", ["left", "right"])
    tree = {"a": [{"b": 1}, 2], "c": Pair(3, 4)}
    paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0/b", "a/1", "c/left", "c/right"]


def test_path_str_of_plain_keys():
    # NNX state paths are tuples of plain strings and ints.
    assert path_str(("layers", 0, "attn", "kernel")) == "layers/0/attn/kernel"
    assert path_str(()) == ""


# --- logical_axes_from_state ------------------------------------------------------------------


class Annotated(nnx.Module):
    def __init__(self, rngs):
        self.table = nnx.Param(jnp.zeros((16, 4)), out_sharding=("vocab", "embed"))
        self.up = nnx.Linear(
            4,
            8,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("embed", "mlp")},
            bias_metadata={"out_sharding": ("mlp",)},
        )
        self.scale = nnx.Param(jnp.ones((4,)), out_sharding=(None,))


class Unannotated(nnx.Module):
    def __init__(self):
        self.ok = nnx.Param(jnp.ones((4,)), out_sharding=("embed",))
        self.gain = nnx.Param(jnp.ones((4,)))


class Outer(nnx.Module):
    def __init__(self):
        self.block = Unannotated()


def make_annotated():
    with nnx.use_eager_sharding(False):  # no mesh context needed
        return Annotated(nnx.Rngs(0))


def test_logical_axes_from_state_is_a_pure_dict_of_tuples():
    axes = logical_axes_from_state(nnx.state(make_annotated()))
    assert axes == {
        "table": ("vocab", "embed"),
        "up": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
        "scale": (None,),
    }
    assert type(axes) is dict and type(axes["up"]) is dict
    assert type(axes["up"]["kernel"]) is tuple


def test_logical_axes_from_state_feed_tree_specs(mesh):
    state = nnx.state(make_annotated())
    params = nnx.to_pure_dict(state)
    specs = tree_specs(params, logical_axes_from_state(state), preset_rules("fsdp_tp"), mesh)
    assert specs == {
        "table": P("model", "data"),
        "up": {"kernel": P("data", "model"), "bias": P("model")},
        "scale": P(None),
    }


def test_param_without_logical_axes_names_its_path():
    with nnx.use_eager_sharding(False):
        model = Outer()
    with pytest.raises(ShardingError) as err:
        logical_axes_from_state(nnx.state(model))
    assert str(err.value) == (
        "parameter block/gain has no logical axes (no out_sharding metadata or Linen partitioning box); "
        "to give it axes by path, use shardlib.logical_axes(state, patterns)"
    )


# --- match_logical_axes -----------------------------------------------------------------------


def foreign_tree():
    """Another project's parameters: nested dicts of numpy arrays, no annotations."""
    return {
        "encoder": {
            "dense": {
                "kernel": np.arange(16 * 32, dtype=np.float32).reshape(16, 32),
                "bias": np.arange(32, dtype=np.float32),
            }
        },
        "head": {"w": np.arange(32 * 8, dtype=np.float32).reshape(32, 8)},
    }


PATTERNS = [
    (r"dense/kernel$", ("embed", "mlp")),
    (r"kernel", ("mlp", "embed")),  # also matches, but comes second
    (r"bias$", ("mlp",)),
    (r"^head/", None),
]
EXPECTED_AXES = {
    "encoder": {"dense": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}},
    "head": {"w": (None, None)},
}


def test_match_logical_axes_first_match_wins_and_none_replicates():
    assert match_logical_axes(foreign_tree(), PATTERNS) == EXPECTED_AXES


def test_match_logical_axes_on_abstract_leaves():
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), foreign_tree())
    assert match_logical_axes(abstract, PATTERNS) == EXPECTED_AXES


def test_match_logical_axes_is_strict():
    with pytest.raises(ShardingError) as err:
        match_logical_axes(foreign_tree(), PATTERNS[:3])
    assert str(err.value) == (
        "head/w (shape (32, 8)) matches no pattern; patterns tried: "
        "['dense/kernel$', 'kernel', 'bias$']. Add a pattern for it, or pass strict=False to "
        "replicate every leaf no pattern matches"
    )


def test_match_logical_axes_catch_all_makes_it_total_when_not_strict():
    axes = match_logical_axes(foreign_tree(), [(r"kernel", ("embed", "mlp")), (".*", None)], strict=False)
    assert axes == {
        "encoder": {"dense": {"kernel": ("embed", "mlp"), "bias": (None,)}},
        "head": {"w": (None, None)},
    }


def test_match_logical_axes_rank_mismatch():
    with pytest.raises(ShardingError) as err:
        match_logical_axes(foreign_tree(), [(r"kernel", ("embed",)), (".*", None)], strict=False)
    assert str(err.value) == (
        "encoder/dense/kernel: pattern 'kernel' gives logical axes ('embed',) but the leaf has shape (16, 32)"
    )


# --- tree_specs, tree_shardings, shard_tree ---------------------------------------------------


def test_tree_specs_and_shardings(mesh):
    rules = preset_rules("fsdp_tp")
    tree = foreign_tree()
    expected = {
        "encoder": {"dense": {"kernel": P("data", "model"), "bias": P("model")}},
        "head": {"w": P(None, None)},
    }
    assert tree_specs(tree, EXPECTED_AXES, rules, mesh) == expected
    shardings = tree_shardings(tree, EXPECTED_AXES, rules, mesh)
    assert jax.tree.map(lambda s: s.spec, shardings) == expected
    assert all(isinstance(s, NamedSharding) and s.mesh is mesh for s in jax.tree.leaves(shardings))


def test_tree_specs_error_names_the_leaf(mesh):
    tree = {"head": {"w": np.zeros((6, 8), np.float32)}}
    with pytest.raises(ShardingError) as err:
        tree_specs(tree, {"head": {"w": ("embed", None)}}, preset_rules("fsdp"), mesh)
    assert str(err.value) == (
        "head/w: dimension 0 ('embed') of shape (6, 8) has size 6, which does not divide by mesh axes data=4 (4 parts)"
    )


def test_shard_tree_places_arrays_and_keeps_values(mesh):
    tree = foreign_tree()
    placed = shard_tree(tree, EXPECTED_AXES, preset_rules("fsdp_tp"), mesh)
    kernel = placed["encoder"]["dense"]["kernel"]
    assert kernel.sharding.mesh is mesh
    assert kernel.sharding.spec == P("data", "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 16)}
    assert placed["encoder"]["dense"]["bias"].sharding.spec == P("model")
    assert {s.data.shape for s in placed["head"]["w"].addressable_shards} == {(32, 8)}
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


# --- optimizer_shardings ----------------------------------------------------------------------


def adam_states(tree):
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    return [x for x in jax.tree.leaves(tree, is_leaf=is_adam) if is_adam(x)]


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.adamw(1e-3),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    ],
    ids=["adamw", "clip+adamw"],
)
def test_optimizer_state_follows_params(mesh, make_tx):
    tx = make_tx()
    rules = preset_rules("fsdp_tp")
    params = shard_tree(foreign_tree(), EXPECTED_AXES, rules, mesh)
    param_shardings = tree_shardings(params, EXPECTED_AXES, rules, mesh)

    shardings = optimizer_shardings(tx, params, param_shardings, mesh)
    [adam] = adam_states(shardings)
    assert adam.mu == param_shardings
    assert adam.nu == param_shardings
    assert adam.count == NamedSharding(mesh, P())
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))

    state = jax.jit(tx.init, out_shardings=shardings)(params)
    [adam_state] = adam_states(state)
    param_specs = specs_of(params)
    assert specs_of(adam_state.mu) == param_specs
    assert specs_of(adam_state.nu) == param_specs
    assert adam_state.count.sharding.spec == P()
    assert adam_state.count.sharding.mesh is mesh
    assert int(adam_state.count) == 0


def test_optimizer_shardings_accept_abstract_params(mesh):
    rules = preset_rules("fsdp")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), foreign_tree())
    param_shardings = tree_shardings(abstract, EXPECTED_AXES, rules, mesh)
    [adam] = adam_states(optimizer_shardings(optax.adam(1e-3), abstract, param_shardings, mesh))
    assert adam.mu["encoder"]["dense"]["kernel"].spec == P("data", None)


# --- ActivationSharding -----------------------------------------------------------------------


def test_activation_spec(mesh):
    shard = ActivationSharding(preset_rules("fsdp_tp"), mesh)
    assert shard.spec((8, 4, 16), ("batch", "length", "embed")) == P("data", None, None)
    assert shard.spec((8, 4, 32), ("batch", "length", "vocab")) == P("data", None, "model")


@pytest.mark.parametrize(
    ("preset", "axes", "expected"),
    [
        ("tp", ("batch", "length", "embed"), P("data", None, None)),
        ("fsdp_tp", ("batch", "length", "vocab"), P("data", None, "model")),
    ],
)
def test_activation_sharding_constrains_inside_jit(mesh, preset, axes, expected):
    shard = ActivationSharding(preset_rules(preset), mesh)
    x = jnp.ones((8, 4, 6))  # single device; without the constraint the output would be too
    y = jax.jit(lambda x: shard(x * 2, axes))(x)
    assert isinstance(y.sharding, NamedSharding)
    assert padded(y.sharding.spec, 3) == expected
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, expected), 3)
    np.testing.assert_array_equal(np.asarray(y), np.full((8, 4, 6), 2.0))


def test_activation_with_non_dividing_batch(mesh):
    shard = ActivationSharding(preset_rules("tp"), mesh)
    with pytest.raises(ShardingError) as err:
        jax.jit(lambda x: shard(x, ("batch", "length", "embed")))(jnp.ones((6, 4, 8)))
    assert str(err.value) == (
        "activation('batch', 'length', 'embed'): dimension 0 ('batch') of shape (6, 4, 8) "
        "has size 6, which does not divide by mesh axes data=4 (4 parts)"
    )


# --- describe ---------------------------------------------------------------------------------


def sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# 3,088 float32 parameters; only norm/scale (64 B, 0.5%) is replicated under tp.
PARAMS = {
    "embed": {"table": sds(64, 16)},
    "mlp": {"up": sds(16, 64), "down": sds(64, 16)},
    "norm": {"scale": sds(16)},
}
AXES = {
    "embed": {"table": ("vocab", "embed")},
    "mlp": {"up": ("embed", "mlp"), "down": ("mlp", "embed")},
    "norm": {"scale": ("embed",)},
}
# Plus a 8 KiB leaf that no preset shards.
BIG_PARAMS = {**PARAMS, "pos": {"table": sds(128, 16)}}
BIG_AXES = {**AXES, "pos": {"table": (None, "embed")}}


def test_describe_rows_and_bytes(mesh):
    desc = describe(PARAMS, AXES, preset_rules("fsdp_tp"), mesh)
    rows = [(r.path, r.shape, r.logical_axes, r.spec, r.bytes_total, r.bytes_per_device) for r in desc.rows]
    assert rows == [
        ("embed/table", (64, 16), ("vocab", "embed"), P("model", "data"), 4096, 512),
        ("mlp/down", (64, 16), ("mlp", "embed"), P("model", "data"), 4096, 512),
        ("mlp/up", (16, 64), ("embed", "mlp"), P("data", "model"), 4096, 512),
        ("norm/scale", (16,), ("embed",), P("data"), 64, 16),
    ]
    assert [r.dtype for r in desc.rows] == ["float32"] * 4
    assert desc.bytes_total == 3 * 4096 + 64
    assert desc.bytes_per_device == 3 * 512 + 16
    assert desc.replicated_fraction == 0.0
    assert desc.mesh_sizes == {"data_replica": 1, "data": 4, "pipe": 1, "expert": 1, "seq": 1, "model": 2}
    assert desc.warnings == []


def test_describe_tp_bytes_and_replicated_fraction(mesh):
    desc = describe(PARAMS, AXES, preset_rules("tp"), mesh)
    assert [r.bytes_per_device for r in desc.rows] == [2048, 2048, 2048, 64]
    assert [r.replicated for r in desc.rows] == [False, False, False, True]
    assert desc.bytes_per_device == 3 * 2048 + 64
    assert desc.replicated_fraction == pytest.approx(64 / (3 * 4096 + 64))  # 0.5%: under 2%
    assert desc.warnings == []


def test_describe_warns_about_a_big_replicated_leaf(mesh):
    desc = describe(BIG_PARAMS, BIG_AXES, preset_rules("tp"), mesh)
    assert desc.replicated_fraction == pytest.approx((8192 + 64) / (3 * 4096 + 64 + 8192))
    assert desc.warnings == [
        (
            "40.2% of parameter bytes are replicated although the rules shard parameters "
            "over model (largest: pos/table, norm/scale)"
        )
    ]


def test_describe_dp_warns_about_the_unused_model_axis_only(mesh):
    # dp shards no parameter, so the replicated-bytes warning does not apply.
    desc = describe(BIG_PARAMS, BIG_AXES, preset_rules("dp"), mesh)
    assert desc.replicated_fraction == 1.0
    assert desc.warnings == [
        (
            "mesh axis 'model' (size 2) shards neither parameters nor the batch: "
            "the 2 devices along it repeat each other's work"
        )
    ]


def test_describe_format(mesh):
    text = describe(PARAMS, AXES, preset_rules("tp"), mesh).format()
    lines = text.splitlines()
    assert lines[0] == "rules (first match wins):"
    assert "  batch     ->  data_replica x data x expert" in lines
    # The totals; the wording of the AdamW line is free, its number (3 x 6.1 KiB) is not.
    assert "parameters: 3,088 (12.1 KiB total, 6.1 KiB per device on 8 devices)" in lines
    assert "AdamW" in lines[-2] and lines[-2].endswith(": 18.2 KiB per device")
    assert lines[-1] == "replicated: 0.5% of parameter bytes"
    assert "WARNING" not in text
    assert "rules" not in describe(PARAMS, AXES, preset_rules("tp"), mesh).format(show_rules=False)


def test_describe_format_lists_warnings(mesh):
    text = describe(BIG_PARAMS, BIG_AXES, preset_rules("dp"), mesh).format()
    assert text.splitlines()[-1].startswith("WARNING: mesh axis 'model' (size 2)")


def test_golden_table(mesh):
    desc = describe(PARAMS, AXES, preset_rules("tp"), mesh)
    assert golden_table(desc) == (
        "embed/table  [64, 16]  (vocab, embed)  P('model', None)\n"
        "mlp/down  [64, 16]  (mlp, embed)  P('model', None)\n"
        "mlp/up  [16, 64]  (embed, mlp)  P(None, 'model')\n"
        "norm/scale  [16]  (embed)  P(None)\n"
    )


def test_golden_table_shows_tuple_axes_and_none():
    sizes_mesh = build_mesh(mesh_spec(data=2, expert=2, model=2))
    params = {"w": sds(8, 4, 16)}
    desc = describe(params, {"w": ("batch", None, "mlp")}, preset_rules("tp"), sizes_mesh)
    assert golden_table(desc) == ("w  [8, 4, 16]  (batch, None, mlp)  P(('data', 'expert'), None, 'model')\n")
    assert desc.rows[0].bytes_per_device == 8 * 4 * 16 * 4 // 8


def test_describe_with_tuple_containers(mesh):
    # tree_specs accepts a (kernel, bias) tuple container, but describe flattens the logical
    # axes with `is_leaf=lambda x: isinstance(x, tuple)`, so the outer tuple of axes becomes
    # one leaf and zip(strict=True) raises "zip() argument 2 is shorter than argument 1".
    params = (sds(16, 32), sds(32))
    axes = (("embed", "mlp"), ("mlp",))
    assert tree_specs(params, axes, preset_rules("tp"), mesh) == (P(None, "model"), P("model"))
    desc = describe(params, axes, preset_rules("tp"), mesh)
    assert [r.spec for r in desc.rows] == [P(None, "model"), P("model")]
