"""Other projects' trees: Flax annotations read directly, patterns and their diagnostics, aliases, foreign meshes.

Nothing here compiles: models are traced with ``jax.eval_shape`` and specs are
resolved against meshes or their axis sizes.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from shardlib import (
    ShardingError,
    ShardingWarning,
    alias_logical_axes,
    logical_axes,
    logical_axes_from_state,
    logical_to_spec,
    map_logical_axes,
    match_logical_axes,
    preset_rules,
    rename_mesh_axes,
    tree_specs,
    unbox,
)
from shardlib.analysis.describe import describe

lp = nn.with_logical_partitioning


class LinenEncoder(nn.Module):
    """T5X/MaxText style: logical names of its own (kv), a position table, an unannotated LayerNorm."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(64, 16, embedding_init=lp(nn.initializers.normal(1.0), ("vocab", "embed")), name="embed")(tokens)
        x = x + self.param("pos_embed", lp(nn.initializers.normal(0.02), ("length", "embed")), (8, 16))
        x = nn.LayerNorm(name="norm")(x)
        kernel = lp(nn.initializers.lecun_normal(), ("embed", "heads", "kv"))
        return nn.DenseGeneral((2, 8), kernel_init=kernel, use_bias=False, name="query")(x)


@pytest.fixture(scope="module")
def linen_variables():
    return jax.eval_shape(LinenEncoder().init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))


LINEN_AXES = {
    "params": {
        "embed": {"embedding": ("vocab", "embed")},
        "pos_embed": ("length", "embed"),
        "norm": {"scale": ("embed",), "bias": ("embed",)},
        "query": {"kernel": ("embed", "heads", "kv")},
    }
}


# --- Linen boxes ------------------------------------------------------------------------------


def test_linen_boxes_give_their_names_and_patterns_cover_the_rest(linen_variables):
    axes = logical_axes(linen_variables, [(r"norm/(scale|bias)$", ("embed",))])
    assert axes == LINEN_AXES
    plain = unbox(linen_variables)
    assert jax.tree.structure(plain) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert plain["params"]["query"]["kernel"].shape == (16, 2, 8)
    # The names are Flax's own: what nn.get_partition_spec reports for every boxed leaf.
    flax_specs = nn.get_partition_spec(linen_variables)
    assert tuple(flax_specs["params"]["query"]["kernel"]) == axes["params"]["query"]["kernel"]


def test_linen_params_in_logical_axes_from_state_name_the_unannotated_leaf(linen_variables):
    # Used to fail with AttributeError: 'dict' object has no attribute '_mapping'.
    with pytest.raises(ShardingError) as err:
        logical_axes_from_state(linen_variables["params"])
    assert str(err.value).startswith("parameter norm/bias has no logical axes")
    annotated = {k: v for k, v in linen_variables["params"].items() if k != "norm"}
    assert logical_axes_from_state(annotated) == {k: v for k, v in LINEN_AXES["params"].items() if k != "norm"}


@pytest.mark.parametrize("caller", [match_logical_axes, lambda tree, _: tree_specs(tree, {}, (), {})])
def test_boxed_trees_are_refused_with_how_to_unbox(linen_variables, caller):
    with pytest.raises(ShardingError) as err:
        caller(linen_variables, [])
    message = str(err.value)
    assert "leaf params/embed/embedding is a Flax LogicallyPartitioned box" in message
    assert "params/embed/embedding/value" in message
    assert "shardlib.unbox" in message and "shardlib.logical_axes" in message


# --- NNX metadata -----------------------------------------------------------------------------


class NNXBlock(nnx.Module):
    """Flax-docs style: metadata on the projections, none on the qk-norm scale."""

    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.qkv = nnx.Linear(16, 48, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("embed", "joined_kv")))
        self.q_norm = nnx.RMSNorm(8, rngs=rngs)
        self.out = nnx.Linear(
            16, 16, use_bias=False, rngs=rngs, kernel_metadata={"out_sharding": ("joined_kv", "embed")}
        )


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([NNXBlock(rngs), NNXBlock(rngs)])


@pytest.fixture(scope="module")
def nnx_state():
    with nnx.use_eager_sharding(False):
        return jax.eval_shape(lambda: nnx.state(NNXModel(nnx.Rngs(0)), nnx.Param))


def test_nnx_metadata_else_pattern(nnx_state):
    axes = logical_axes(nnx_state, [(r"q_norm/scale$", (None,)), (r"qkv/bias$", ("joined_kv",))])
    block = {
        "qkv": {"kernel": ("embed", "joined_kv"), "bias": ("joined_kv",)},
        "q_norm": {"scale": (None,)},
        "out": {"kernel": ("joined_kv", "embed")},
    }
    assert axes == {"blocks": {0: block, 1: block}}
    assert jax.tree.structure(nnx.to_pure_dict(nnx_state)) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple)
    )


def test_nnx_leaves_neither_covers_are_named(nnx_state):
    with pytest.raises(ShardingError) as err:
        logical_axes(nnx_state, [(r"qkv/bias$", ("joined_kv",))])
    assert str(err.value) == (
        "2 leaves match no pattern (no Flax metadata either): blocks/0/q_norm/scale (8,), "
        "blocks/1/q_norm/scale (8,); patterns tried: ['qkv/bias$']. Add patterns for them, or pass "
        "strict=False to replicate every leaf no pattern matches"
    )


def test_nnx_metadata_of_the_wrong_rank_is_named():
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.Dict(w=nnx.Param(jnp.zeros((4, 2)), out_sharding=("embed",))))
    with pytest.raises(ShardingError) as err:
        logical_axes(state)
    assert str(err.value) == "w: its Flax metadata names logical axes ('embed',) but the leaf has shape (4, 2)"


def test_a_module_is_refused_with_what_to_pass():
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: NNXBlock(nnx.Rngs(0)))
    with pytest.raises(ShardingError, match=r"nnx\.state\(model, nnx\.Param\)"):
        logical_axes(model)


# --- patterns ---------------------------------------------------------------------------------


def embeddings():
    return {
        "embed": {"embedding": np.zeros((64, 16))},
        "pos_embed": {"embedding": np.zeros((8, 16))},
        "norm": {"scale": np.zeros((16,))},
    }


def test_patterns_match_whole_path_segments():
    # `embed/embedding$` no longer matches `pos_embed/embedding` (a substring search did).
    with pytest.raises(ShardingError, match=r"^pos_embed/embedding \(shape \(8, 16\)\) matches no pattern"):
        match_logical_axes(embeddings(), [("embed/embedding$", ("vocab", "embed")), ("scale", ("embed",))])
    axes = match_logical_axes(
        embeddings(),
        [("embed/embedding$", ("vocab", "embed")), ("^pos_embed/", ("length", "embed")), ("norm", ("embed",))],
    )
    assert axes["pos_embed"]["embedding"] == ("length", "embed")
    assert match_logical_axes({"kernel_scale": np.zeros(3)}, [(".*scale", (None,))]) == {"kernel_scale": (None,)}


def test_a_pattern_with_two_roles_warns():
    with pytest.warns(ShardingWarning) as record:
        match_logical_axes(embeddings(), [("embedding", ("vocab", "embed")), ("scale", ("embed",))])
    [warning] = record
    assert str(warning.message) == (
        "pattern 'embedding' gives logical axes ('vocab', 'embed') to leaves whose dimension 0 ('vocab') differs: "
        "embed/embedding (64, 16) and pos_embed/embedding (8, 16); one pattern, two roles? Split it, or anchor "
        "it to the parameters meant"
    )


def test_a_replicating_pattern_of_two_ranks_warns():
    with pytest.warns(ShardingWarning, match=r"pattern 'embed/embedding\|norm' matches leaves of different ranks"):
        match_logical_axes(embeddings(), [("embed/embedding|norm", None), ("pos_embed", None)])


def test_no_warning_for_consistent_patterns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        match_logical_axes(
            embeddings(), [("embed/embedding", ("vocab", "embed")), ("pos_embed", None), ("scale", ("embed",))]
        )


def test_a_catch_all_needs_strict_false():
    with pytest.raises(ShardingError, match=r"^pattern '\.\*' is a catch-all"):
        match_logical_axes(embeddings(), [("scale", ("embed",)), (".*", None)])
    axes = match_logical_axes(embeddings(), [("scale", ("embed",)), (".*", None)], strict=False)
    assert axes["embed"]["embedding"] == (None, None)


def test_a_pattern_matching_nothing_is_an_error_or_a_warning():
    table = [("norm/scael", ("embed",)), ("embedding", None), ("scale", None)]
    with pytest.raises(ShardingError) as err:
        match_logical_axes(embeddings(), table)
    assert str(err.value) == (
        "pattern(s) ['norm/scael'] match no leaf (mistyped, or for another model?); remove them, "
        "or pass strict=False to only warn"
    )
    with pytest.warns(ShardingWarning, match=r"\['norm/scael'\] match no leaf"):
        match_logical_axes(embeddings(), table, strict=False)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            [("(", None)],
            "pattern '(' is not a valid regular expression: missing ), unterminated subpattern at position 0",
        ),
        ([("scale",)], "pattern 0 is ('scale',); a pattern is a (regex, logical axes or None) pair"),
        ([("scale", "embed")], "pattern 'scale' gives 'embed'; expected a tuple of logical names"),
    ],
)
def test_malformed_patterns_are_named(table, message):
    with pytest.raises(ShardingError) as err:
        match_logical_axes(embeddings(), table)
    assert str(err.value).startswith(message)


def test_map_logical_axes_keeps_each_tuple_whole():
    axes = {"w": ("embed", None), "b": (None,)}
    assert jax.tree.leaves(axes) == ["embed"]  # a plain tree map walks into the tuples and drops the Nones
    assert map_logical_axes(len, axes) == {"w": 2, "b": 1}
    assert map_logical_axes(lambda a, x: a + x.shape, axes, {"w": np.zeros((2, 3)), "b": np.zeros(3)}) == {
        "w": ("embed", None, 2, 3),
        "b": (None, 3),
    }


# --- logical aliases --------------------------------------------------------------------------

ALIASES = {"kv": "head_dim", "joined_kv": ("heads", "head_dim"), "embed_mlp": ("embed", "mlp")}
SIZES = {"data_replica": 1, "data": 2, "pipe": 1, "expert": 1, "seq": 1, "model": 2}


@pytest.mark.parametrize(
    ("preset", "axes", "expected"),
    [
        ("tp", ("embed", "heads", "kv"), P(None, "model", None)),
        ("tp", ("embed", "joined_kv"), P(None, "model")),
        ("fsdp_tp", ("joined_kv", "embed"), P("model", "data")),
        ("fsdp", ("embed", "joined_kv"), P("data", None)),
        ("fsdp_tp", ("embed_mlp",), P(("data", "model"))),  # a joined dimension split over both, in order
        ("fsdp_tp", ("batch", "embed_mlp"), P("data", "model")),  # data taken by the batch: the fallback
    ],
)
def test_aliases_resolve_like_what_they_stand_for(preset, axes, expected):
    rules = alias_logical_axes(preset_rules(preset), ALIASES)
    assert logical_to_spec(axes, rules, SIZES, shape=(8,) * len(axes)) == expected


def test_a_joined_dimension_must_divide_by_all_its_axes():
    rules = alias_logical_axes(preset_rules("fsdp_tp"), ALIASES)
    with pytest.raises(ShardingError, match=r"dimension 0 \('embed_mlp'\) of shape \(6,\) has size 6"):
        logical_to_spec(("embed_mlp",), rules, SIZES, shape=(6,), path="w")


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({"embed": "mlp"}, "alias 'embed' already has rules in the table"),
        ({"kv": "head_dm"}, "alias 'kv' stands for 'head_dm', which has no rule. Did you mean head_dim, heads?"),
        ({"kv": 3}, "alias 'kv' stands for 3; expected a logical name or a tuple of them"),
    ],
)
def test_alias_errors(aliases, message):
    with pytest.raises(ShardingError) as err:
        alias_logical_axes(preset_rules("tp"), aliases)
    assert str(err.value).startswith(message)


# --- foreign meshes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_tp_mesh():
    """A project's own mesh: its own axis names, Explicit axes (jax.make_mesh's default)."""
    return jax.make_mesh((2, 2), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:4])


def test_preset_rules_on_a_foreign_mesh(fsdp_tp_mesh):
    rules = preset_rules("fsdp_tp", mesh=fsdp_tp_mesh, mesh_axes={"data": "fsdp", "model": "tp"})
    named = {axis for _, axes in rules for axis in ((axes,) if isinstance(axes, str) else axes or ())}
    assert named == {"fsdp", "tp"}  # pipe, expert and seq are gone: the mesh has no such axes
    assert logical_to_spec(("batch", "length", "embed"), rules, fsdp_tp_mesh) == P("fsdp", None, None)
    assert logical_to_spec(("embed", "mlp"), rules, fsdp_tp_mesh) == P("fsdp", "tp")


def test_preset_rules_refuse_a_mesh_lacking_their_axes(fsdp_tp_mesh):
    with pytest.raises(ShardingError) as err:
        preset_rules("tp", mesh=fsdp_tp_mesh)
    assert str(err.value) == (
        "preset 'tp' splits 'batch' over mesh axis 'data', which the mesh (fsdp, tp) lacks; "
        "pass mesh_axes={'data': <your axis or None>}"
    )
    with pytest.raises(ShardingError, match=r"sends 'vocab' to mesh axis 'tensor', which the mesh \(fsdp, tp\) lacks"):
        preset_rules("tp", mesh=fsdp_tp_mesh, mesh_axes={"data": "fsdp", "model": "tensor"})
    with pytest.raises(ShardingError, match=r"mesh_axes maps 'modle', which is not a shardlib mesh axis \(did you"):
        rename_mesh_axes(preset_rules("tp"), {"modle": "tp"})


def test_a_data_axis_may_stay_and_tensor_be_renamed():
    sizes = {"data": 2, "tensor": 2}
    rules = preset_rules("tp", mesh=sizes, mesh_axes={"model": "tensor"})
    assert logical_to_spec(("batch", "mlp"), rules, sizes) == P("data", "tensor")


def test_describe_on_a_foreign_tree_and_mesh(linen_variables, fsdp_tp_mesh):
    rules = alias_logical_axes(
        preset_rules("fsdp_tp", mesh=fsdp_tp_mesh, mesh_axes={"data": "fsdp", "model": "tp"}), ALIASES
    )
    axes = logical_axes(linen_variables, [(r"norm/(scale|bias)$", ("embed",))])
    desc = describe(unbox(linen_variables), axes, rules, fsdp_tp_mesh)
    rows = {r.path: r.spec for r in desc.rows}
    assert rows["params/query/kernel"] == P("fsdp", "tp", None)
    assert rows["params/embed/embedding"] == P("tp", "fsdp")
    assert "params/pos_embed" in desc.format()
