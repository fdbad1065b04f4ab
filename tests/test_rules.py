"""Tests for shardlib.core.rules: resolving logical axes to PartitionSpecs, presets, validation.

Most tests pass a dict of mesh-axis sizes instead of a mesh: ``logical_to_spec`` accepts
either, and a dict lets us try meshes of any shape (such as every axis of size 2) without
devices. conftest.py gives this process 8 emulated CPU devices for the tests that build one.
"""

import flax.linen as nn
import jax.numpy as jnp
import pytest
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.core.mesh import MESH_AXES, build_mesh, mesh_spec
from shardlib.core.rules import (
    PRESETS,
    ShardingError,
    ShardingIntent,
    axes_tuple,
    check_mesh_fits_intent,
    compile_rules,
    format_rules,
    logical_to_sharding,
    logical_to_spec,
    preset_rules,
    validate_rules,
)


def sizes(**nontrivial):
    """All five mesh-axis sizes, 1 unless given."""
    return {axis: nontrivial.get(axis, 1) for axis in MESH_AXES}


DATA4_MODEL2 = sizes(data=4, model=2)  # the 8-device CPU mesh
ALL2 = sizes(data_replica=2, data=2, pipe=2, expert=2, seq=2, model=2)  # no axis of size 1: nothing is dropped


# --- resolution semantics ---------------------------------------------------------------------


def test_first_rule_for_a_name_wins():
    rules = (("embed", "data"), ("embed", "model"))
    assert logical_to_spec(("embed",), rules, ALL2) == P("data")


def test_explicit_none_rule_replicates_and_wins_when_first():
    rules = (("embed", None), ("embed", "data"))
    assert logical_to_spec(("embed", "embed"), rules, ALL2) == P(None, None)


def test_later_rule_is_a_fallback_when_the_first_rules_axes_are_taken():
    rules = (("batch", "data"), ("embed", "data"), ("embed", "model"))
    assert logical_to_spec(("embed",), rules, ALL2) == P("data")  # data free: first rule
    assert logical_to_spec(("batch", "embed"), rules, ALL2) == P("data", "model")


def test_replicate_fallback_after_a_taken_axis():
    rules = (("batch", "data"), ("embed", "data"), ("embed", None))
    assert logical_to_spec(("batch", None, "embed"), rules, ALL2) == P("data", None, None)


def test_dimensions_resolve_left_to_right():
    # The earlier *dimension* takes the axis, whatever the order of the rules.
    rules = (("b", "data"), ("a", "data"), ("a", None), ("b", None))
    assert logical_to_spec(("a", "b"), rules, ALL2) == P("data", None)
    assert logical_to_spec(("b", "a"), rules, ALL2) == P("data", None)


def test_tuple_rule_keeps_only_its_free_axes():
    rules = (("experts", "expert"), ("batch", ("data", "expert")))
    assert logical_to_spec(("batch",), rules, ALL2) == P(("data", "expert"))
    assert logical_to_spec(("experts", "batch"), rules, ALL2) == P("expert", "data")


def test_none_dimensions_are_replicated():
    rules = (("mlp", "model"),)
    assert logical_to_spec((None, "mlp", None), rules, ALL2) == P(None, "model", None)
    assert logical_to_spec((), rules, ALL2) == P()


def test_size_one_mesh_axes_are_dropped():
    rules = (("batch", ("data", "expert")), ("length", "seq"), ("mlp", "model"))
    axes = ("batch", "length", "mlp")
    assert logical_to_spec(axes, rules, ALL2) == P(("data", "expert"), "seq", "model")
    assert logical_to_spec(axes, rules, DATA4_MODEL2) == P("data", None, "model")
    assert logical_to_spec(axes, rules, sizes()) == P(None, None, None)


def test_size_one_axes_do_not_count_as_taken():
    # On model=2 the second dimension would clash; on model=1 neither dimension takes it.
    rules = (("heads", "model"), ("mlp", "model"))
    assert logical_to_spec(("heads", "mlp"), rules, sizes(data=8)) == P(None, None)
    with pytest.raises(ShardingError, match="both resolve to mesh axis 'model'"):
        logical_to_spec(("heads", "mlp"), rules, DATA4_MODEL2)
    # Same inside a tuple rule: a size-1 `expert` used by `experts` leaves `batch` alone.
    rules = (("experts", "expert"), ("batch", ("data", "expert")))
    assert logical_to_spec(("experts", "batch"), rules, DATA4_MODEL2) == P(None, "data")


def test_divisibility_only_counts_axes_that_remain():
    rules = (("batch", ("data", "expert")),)
    # 4 divides by data=4; expert has size 1 and is not part of the product.
    assert logical_to_spec(("batch",), rules, DATA4_MODEL2, shape=(4,)) == P("data")
    # Without a shape there is no divisibility check.
    assert logical_to_spec(("batch",), rules, DATA4_MODEL2) == P("data")


def test_lists_work_like_tuples():
    rules = (("batch", ["data", "expert"]),)
    assert logical_to_spec(["batch"], rules, ALL2) == P(("data", "expert"))


def test_logical_to_sharding_binds_the_mesh():
    mesh = build_mesh(mesh_spec(data=4, model=2))
    sharding = logical_to_sharding(("batch", "embed"), preset_rules("fsdp_tp"), mesh, shape=(8, 16))
    assert isinstance(sharding, NamedSharding)
    assert sharding.mesh is mesh
    assert sharding.spec == P("data", None)


# --- errors -----------------------------------------------------------------------------------

SMALL = (("batch", "data"), ("embed", None), ("mlp", "model"))


def test_sharding_error_is_a_value_error():
    assert issubclass(ShardingError, ValueError)


def test_unknown_logical_name_suggests_a_close_match():
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("batch", "embd"), SMALL, ALL2, path="decoder/w")
    assert str(err.value) == (
        "decoder/w: logical axis 'embd' (dimension 1) has no rule. Did you mean embed? "
        "Known logical axes: batch, embed, mlp"
    )


def test_unknown_logical_name_without_close_match():
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("zzz",), SMALL, ALL2)
    assert str(err.value).startswith("<array>: logical axis 'zzz' (dimension 0) has no rule")
    assert str(err.value).endswith("Known logical axes: batch, embed, mlp")
    assert "did you mean" not in str(err.value).lower()


def test_unknown_logical_name_message_is_punctuated():
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("zzz",), SMALL, ALL2)
    assert "has no rule Known" not in str(err.value)


def test_dimension_that_does_not_divide():
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("batch", "embed"), SMALL, DATA4_MODEL2, shape=(6, 8), path="decoder/w")
    assert str(err.value) == (
        "decoder/w: dimension 0 ('batch') of shape (6, 8) has size 6, "
        "which does not divide by mesh axes data=4 (4 parts)"
    )


def test_dimension_that_does_not_divide_a_tuple_of_axes():
    rules = (("batch", ("data", "expert")),)
    with pytest.raises(ShardingError) as err:
        logical_to_spec((None, "batch"), rules, ALL2, shape=(3, 6), path="x")
    assert str(err.value) == (
        "x: dimension 1 ('batch') of shape (3, 6) has size 6, "
        "which does not divide by mesh axes data=2 x expert=2 (4 parts)"
    )


def test_two_dimensions_on_one_mesh_axis_without_fallback():
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("heads", "mlp"), preset_rules("tp"), DATA4_MODEL2, path="attn/w")
    assert str(err.value) == (
        "attn/w: dimensions 0 ('heads') and 1 ('mlp') both resolve to mesh axis 'model'; "
        "add a fallback rule such as ('mlp', None) after ('mlp', 'model')"
    )


def test_rank_mismatch():
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("embed",), SMALL, ALL2, shape=(4, 8), path="decoder/w")
    assert str(err.value) == ("decoder/w: shape (4, 8) has 2 dimensions but logical axes ('embed',) name 1")


def test_rule_naming_an_unknown_mesh_axis():
    rules = (("embed", None), ("batch", "dta"))
    expected = "rule 1 ('batch') names mesh axis 'dta'; the mesh has data_replica, data, pipe, expert, seq, model"
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("batch",), rules, DATA4_MODEL2)
    assert str(err.value) == expected
    # The whole table is checked up front: a typo fails even for tensors that do not use it.
    with pytest.raises(ShardingError, match="'dta'"):
        logical_to_spec(("embed",), rules, DATA4_MODEL2)


def test_unknown_preset():
    with pytest.raises(ShardingError) as err:
        preset_rules("zero3")
    assert str(err.value) == "unknown sharding preset 'zero3'; known presets: dp, fsdp, tp, fsdp_tp, hsdp, hsdp_tp"


# --- presets that need a mesh of their own shape ------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "mesh", "message"),
    [
        # Without replica groups, HSDP would be FSDP over every data device ...
        ("hsdp_tp", sizes(data=4, model=2), r"data_replica=1.*meshes/cpu-8-hsdp.yaml.*'fsdp_tp'"),
        # ... and without data inside each group, plain data parallelism: nothing left to shard over.
        ("hsdp", sizes(data_replica=8), r"preset 'hsdp' shards the parameters over data inside each data_replica"),
        ("hsdp_tp", sizes(data_replica=4, model=2), r"has data=1 \(data_replica=4\).*or preset 'tp'"),
    ],
)
def test_an_hsdp_preset_is_refused_on_a_mesh_it_would_not_be_hsdp_on(preset, mesh, message):
    with pytest.raises(ShardingError, match=message):
        check_mesh_fits_intent(preset, mesh)
    with pytest.raises(ShardingError, match=message):  # the rules alone, given the mesh, as the trainer's
        preset_rules(preset, mesh=mesh)
    preset_rules(preset)  # without a mesh: the table, for any mesh
    check_mesh_fits_intent(preset, sizes(data_replica=2, data=2, model=2))


def test_an_hsdp_preset_on_a_projects_mesh_reads_the_axes_it_is_renamed_to():
    mesh = {"replica": 2, "fsdp": 2}
    rules = preset_rules("hsdp", mesh=mesh, mesh_axes={"data_replica": "replica", "data": "fsdp"})
    assert logical_to_spec(("batch", "embed"), rules, mesh) == P(("replica", "fsdp"), None)
    with pytest.raises(ShardingError, match=r"preset 'hsdp' keeps a copy of the parameters per data_replica group"):
        preset_rules("hsdp", mesh=mesh, mesh_axes={"data": "fsdp", "data_replica": None})


def test_the_trainer_refuses_hsdp_on_replica_groups_of_one_device():
    """``sharding=hsdp`` on ``{data_replica: 8}`` would train as plain data parallelism."""
    from shardlib.training.setup import setup_training
    from tests.support import mesh_of, tiny_config

    with pytest.raises(ShardingError, match=r"preset 'hsdp' shards the parameters over data inside each"):
        setup_training(tiny_config(sharding="hsdp"), mesh_of(data_replica=8))


# --- validate_rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate(preset):
    validate_rules(preset_rules(preset))  # against MESH_AXES
    validate_rules(preset_rules(preset), build_mesh(mesh_spec(data=4, model=2)))
    validate_rules(preset_rules(preset), DATA4_MODEL2)


def test_validate_rules_names_the_unknown_mesh_axis():
    with pytest.raises(ShardingError) as err:
        validate_rules((("embed", None), ("batch", ("data", "dta"))))
    assert str(err.value) == (
        "rule 1 ('batch') names mesh axis 'dta'; the mesh has data_replica, data, pipe, expert, seq, model"
    )


def test_validate_rules_against_a_smaller_mesh():
    with pytest.raises(ShardingError) as err:
        validate_rules(preset_rules("tp"), {"data": 4, "model": 2})
    assert str(err.value) == "rule 0 ('batch') names mesh axis 'data_replica'; the mesh has data, model"


@pytest.mark.parametrize("rule", [("batch",), ("batch", "data", "model"), (3, "data"), "batch"])
def test_validate_rules_rejects_malformed_rules(rule):
    with pytest.raises(ShardingError) as err:
        validate_rules((("embed", None), rule))
    assert str(err.value) == f"rule 1 is {rule!r}; a rule is a (logical name, mesh axes) pair"


def test_validate_rules_rejects_non_string_mesh_axes():
    # _as_tuple(3) calls tuple(3): TypeError("'int' object is not iterable"), not ShardingError.
    with pytest.raises(ShardingError, match="rule 0"):
        validate_rules((("batch", 3),))


def test_rule_repeating_a_mesh_axis_is_rejected():
    # Today logical_to_spec returns P(('data', 'data')) (which NamedSharding rejects later,
    # with a JAX error) and validate_rules accepts the table.
    rules = (("batch", ("data", "data")),)
    with pytest.raises(ShardingError):
        logical_to_spec(("batch",), rules, ALL2)


# --- presets ----------------------------------------------------------------------------------


def test_fsdp_tp_table():
    assert preset_rules("fsdp_tp") == (
        ("batch", ("data_replica", "data", "expert")),
        ("length", "seq"),
        ("layers", "pipe"),
        ("experts", "expert"),
        ("vocab", "model"),
        ("heads", "model"),
        ("kv_heads", "model"),
        ("mlp", "model"),
        ("embed", "data"),
        ("embed", None),
        ("head_dim", None),
    )


def test_dp_replicates_every_weight_name():
    rules = dict(preset_rules("dp"))  # dp has one rule per name
    assert len(rules) == len(preset_rules("dp"))
    assert rules["batch"] == ("data_replica", "data", "expert")
    for name in ("vocab", "heads", "kv_heads", "mlp", "embed", "head_dim"):
        assert rules[name] is None, name


def test_fsdp_puts_embed_on_data_then_falls_back_to_replicated():
    rules = preset_rules("fsdp")
    embed = [axes for name, axes in rules if name == "embed"]
    assert embed == ["data", None]
    for name in ("vocab", "heads", "kv_heads", "mlp"):
        assert dict(rules)[name] is None, name


def test_tp_puts_heads_mlp_and_vocab_on_model():
    rules = preset_rules("tp")
    for name in ("vocab", "heads", "kv_heads", "mlp"):
        assert dict(rules)[name] == "model", name
    assert [axes for name, axes in rules if name == "embed"] == [None]


def test_compile_rules_with_several_axes_per_intent():
    intent = ShardingIntent(batch=(), fsdp=("data", "expert"), tensor=("seq", "model"))
    rules = compile_rules(intent)
    assert rules[0] == ("batch", None)
    assert dict(rules)["mlp"] == ("seq", "model")
    assert [axes for name, axes in rules if name == "embed"] == [("data", "expert"), None]


# (logical axes, expected spec) on the 5-axis data=4 x model=2 mesh, per preset.
PRESET_CASES = {
    "dp": [
        (("batch", "length", "embed"), P("data", None, None)),
        (("embed", "mlp"), P(None, None)),
        (("vocab", "embed"), P(None, None)),
    ],
    "fsdp": [
        (("embed", "mlp"), P("data", None)),
        (("mlp", "embed"), P(None, "data")),
        (("vocab", "embed"), P(None, "data")),
        (("layers", "embed", "heads", "head_dim"), P(None, "data", None, None)),
        # Activations: batch took data, so embed uses the ("embed", None) fallback.
        (("batch", "length", "embed"), P("data", None, None)),
    ],
    "tp": [
        (("embed", "heads", "head_dim"), P(None, "model", None)),
        (("embed", "kv_heads", "head_dim"), P(None, "model", None)),
        (("heads", "head_dim", "embed"), P("model", None, None)),
        (("embed", "mlp"), P(None, "model")),
        (("mlp", "embed"), P("model", None)),
        (("vocab", "embed"), P("model", None)),
        (("batch", "length", "embed"), P("data", None, None)),
        (("batch", "length", "vocab"), P("data", None, "model")),
    ],
    "fsdp_tp": [
        (("embed", "heads", "head_dim"), P("data", "model", None)),
        (("embed", "kv_heads", "head_dim"), P("data", "model", None)),
        (("embed", "mlp"), P("data", "model")),
        (("mlp", "embed"), P("model", "data")),
        (("vocab", "embed"), P("model", "data")),
        (("batch", "length", "embed"), P("data", None, None)),
    ],
}


@pytest.mark.parametrize(
    ("preset", "axes", "expected"),
    [(p, axes, spec) for p, cases in PRESET_CASES.items() for axes, spec in cases],
)
def test_preset_resolution_on_the_8_device_mesh(preset, axes, expected):
    assert logical_to_spec(axes, preset_rules(preset), DATA4_MODEL2) == expected


def test_preset_resolution_on_a_mesh_with_every_axis():
    rules = preset_rules("fsdp_tp")
    assert logical_to_spec(("batch", "length", "embed"), rules, ALL2) == P(
        ("data_replica", "data", "expert"), "seq", None
    )
    assert logical_to_spec(("layers", "experts", "embed", "mlp"), rules, ALL2) == P("pipe", "expert", "data", "model")
    # No parameter dimension is ever split over data_replica: HSDP's copies per replica group.
    for name, axes in rules:
        assert name == "batch" or "data_replica" not in axes_tuple(axes), name


# --- agreement with Flax ----------------------------------------------------------------------
#
# Known differences, so these cases avoid them:
# * flax.linen.logical_to_mesh_axes walks the *rules* in order and gives each rule's axes to the
#   first dimension with that name; shardlib walks the *dimensions* left to right. With a tuple
#   rule they differ: ("experts", "batch") under any preset is P("expert", "data") here (batch
#   keeps its free axis) but P(None, ("data", "expert")) in Flax (batch's rule comes first).
# * Flax never drops size-1 mesh axes, hence the ALL2 sizes below.
# * Flax rejects a name used twice in one tensor; shardlib resolves it.
# * nnx.get_partition_spec (and NNX eager sharding) resolve names through a dict built from
#   the rules, so the *last* rule for a name wins: under "fsdp" NNX maps embed to None (the
#   fallback), not to data. Only the tp preset, with one rule per name, agrees there.

FLAX_CASES = [
    ("batch", "length", "embed"),
    ("batch", "length", "vocab"),
    ("batch", "length", "heads", "head_dim"),
    ("embed", "mlp"),
    ("mlp", "embed"),
    ("vocab", "embed"),
    ("embed", "heads", "head_dim"),
    ("embed", "kv_heads", "head_dim"),
    ("layers", "embed", "mlp"),
    ("experts", "embed", "mlp"),
    (None, "embed"),
]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_flax_linen_agrees_on_simple_axes(preset):
    rules = preset_rules(preset)
    for axes in FLAX_CASES:
        assert logical_to_spec(axes, rules, ALL2) == nn.logical_to_mesh_axes(axes, rules), axes


def test_nnx_logical_axis_rules_accepts_the_table():
    rules = preset_rules("fsdp_tp")
    with nnx.logical_axis_rules(rules):
        assert flax_spmd.get_logical_axis_rules() == rules
        # linen reads the same context when no rules are passed.
        assert nn.logical_to_mesh_axes(("embed", "mlp")) == P("data", "model")
    assert flax_spmd.get_logical_axis_rules() != rules


def test_nnx_get_partition_spec_agrees_for_tp():
    class Block(nnx.Module):
        def __init__(self):
            self.up = nnx.Param(jnp.zeros((4, 8)), out_sharding=("embed", "mlp"))
            self.qkv = nnx.Param(jnp.zeros((4, 2, 2)), out_sharding=("embed", "heads", "head_dim"))
            self.table = nnx.Param(jnp.zeros((16, 4)), out_sharding=("vocab", "embed"))

    with nnx.use_eager_sharding(False):
        block = Block()
    rules = preset_rules("tp")
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(block))
    for name in ("up", "qkv", "table"):
        axes = getattr(block, name).get_metadata()["out_sharding"]
        assert specs[name].get_value() == logical_to_spec(axes, rules, ALL2), name


# --- format_rules -----------------------------------------------------------------------------


def test_format_rules():
    rules = (("batch", ("data", "expert")), ("embed", "data"), ("embed", None), ("head_dim", None))
    assert format_rules(rules) == (
        "batch     ->  data x expert\nembed     ->  data\nembed     ->  replicated\nhead_dim  ->  replicated"
    )


def test_format_rules_empty():
    assert format_rules(()) == ""
