"""shardlib.parallel.reduction on its own: gradients equal the partitioner's, collectives are the minimum.

One weight use, x_BxLxD @ w_DxF, on 8 emulated devices: FSDP (w split over
``data``), data x seq (w replicated, tokens over both) and HSDP-shaped
(w split over ``seq`` standing in for the in-host part, tokens over both).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.layers import WEIGHT_USES
from shardlib.analysis.report.collectives import find_collectives
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.parallel.reduction import ReducedWeightUse, lookup_gathers_table
from tests.support import assert_trees_close, mesh_of


def _activation_spec(rows, positions):
    """Activations split over ``rows`` (batch) and ``positions`` (length), nothing else."""
    return lambda shape, axes: P(rows or None, positions or None)


CASES = {
    # name: (mesh sizes, batch axes, length axes, w spec, expected reductions {kind: axes})
    "fsdp": ({"data": 8}, ("data",), (), P("data", None), {"reduce-scatter": ("data",)}),
    "data_x_seq": ({"data": 2, "seq": 4}, ("data",), ("seq",), P(), {"all-reduce": ("data", "seq")}),
    "shard_then_replicas": (
        {"data": 2, "seq": 4},
        ("data",),
        ("seq",),
        P("seq", None),
        {"reduce-scatter": ("seq",), "all-reduce": ("data",)},
    ),
}


def _loss(use):
    def loss(w_DxF, x_BxLxD):
        return jnp.mean(jnp.tanh(use("unembed", x_BxLxD, w_DxF)) ** 2)

    return loss


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(0), 2)
    return jax.random.normal(keys[0], (32, 32)) / 4, jax.random.normal(keys[1], (8, 16, 32))


@pytest.mark.parametrize("case", CASES)
def test_reduced_gradient_equals_the_plain_one_and_moves_the_minimum(case, inputs):
    sizes, rows, positions, spec, expected = CASES[case]
    mesh = mesh_of(**sizes)
    w_DxF, x_BxLxD = inputs
    reference = jax.grad(_loss(lambda name, x, w: WEIGHT_USES[name].apply(x, w)))(w_DxF, x_BxLxD)

    use = ReducedWeightUse(mesh, WEIGHT_USES, {"unembed": spec}, _activation_spec(rows, positions), rows, positions)
    w_sharding = NamedSharding(mesh, spec)
    x_sharding = NamedSharding(mesh, P(rows, positions or None))
    grad = jax.jit(jax.grad(_loss(use)), in_shardings=(w_sharding, x_sharding), out_shardings=w_sharding)
    assert_trees_close(grad(w_DxF, x_BxLxD), reference, what=case)

    text = grad.lower(w_DxF, x_BxLxD).compile().as_text()
    found = [c for c in find_collectives(parse_hlo(text), dict(mesh.shape)) if c.kind != "all-gather"]
    weight_sized = sorted((c.kind, c.axes) for c in found if c.buffer_bytes >= w_DxF.size * 4 // 8)
    assert weight_sized == sorted(expected.items()), found  # one op each: no reduction twice
    assert not any(c.sliced for c in found)


def test_a_lookup_gathers_its_table_only_when_that_is_cheaper():
    """V <= tokens per device: the table is gathered and its gradient reduce-scattered; else the partitioner's."""
    assert lookup_gathers_table(256, 512) and not lookup_gathers_table(50_304, 8_192)
    mesh = mesh_of(data=8)
    table_VxD = jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) / 100
    use = ReducedWeightUse(mesh, WEIGHT_USES, {"embedding": P(None, "data")}, _activation_spec("data", ()), ("data",))

    def loss(table, ids):
        return jnp.sum(jnp.sin(use("embedding", ids, table)))

    def compiled_kinds(ids):
        fn = jax.jit(
            jax.grad(loss),
            in_shardings=(NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P("data"))),
            out_shardings=NamedSharding(mesh, P(None, "data")),
        )
        plain = jax.grad(lambda t, i: jnp.sum(jnp.sin(jnp.take(t, i, axis=0))))(table_VxD, ids)
        assert_trees_close(fn(table_VxD, ids), plain, what="table gradient")
        text = fn.lower(table_VxD, ids).compile().as_text()
        return {c.kind for c in find_collectives(parse_hlo(text), dict(mesh.shape))}

    many = jnp.asarray(np.random.default_rng(0).integers(0, 64, (16, 64)), jnp.int32)  # 128 tokens a device
    few = many[:, :4]  # 8 tokens a device < 64 rows
    assert compiled_kinds(many) == {"all-gather", "reduce-scatter"}
    assert "reduce-scatter" not in compiled_kinds(few)


@pytest.mark.parametrize(
    ("sizes", "table_spec"),
    [({"data": 4, "model": 2}, P("model", "data")), ({"data": 4, "model": 2}, P("model", None))],
    ids=["fsdp_tp", "tp"],
)
def test_a_vocabulary_parallel_lookups_gradient_is_reduced_on_each_rows_block(sizes, table_spec):
    """Table rows over ``model``: each device scatters only the ids its block holds, then one reduction."""
    mesh = mesh_of(**sizes)
    table_VxD = jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) / 100
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 64)), jnp.int32)
    use = ReducedWeightUse(mesh, WEIGHT_USES, {"embedding": table_spec}, _activation_spec("data", ()), ("data",))
    sharding = NamedSharding(mesh, table_spec)
    fn = jax.jit(
        jax.grad(lambda t, i: jnp.sum(jnp.sin(use("embedding", i, t)))),
        in_shardings=(sharding, NamedSharding(mesh, P("data"))),
        out_shardings=sharding,
    )
    plain = jax.grad(lambda t, i: jnp.sum(jnp.sin(jnp.take(t, i, axis=0))))(table_VxD, ids)
    assert_trees_close(fn(table_VxD, ids), plain, what="table gradient")
    text = fn.lower(table_VxD, ids).compile().as_text()
    # The gradient's own reductions (the forward's vocabulary-parallel all-reduce aside): one, of the block.
    reductions = [c for c in find_collectives(parse_hlo(text), dict(mesh.shape)) if "shard_map" in c.op_name]
    block = table_VxD.size * 4 // 2  # the rows block of one model device
    assert [(c.axes, c.buffer_bytes) for c in reductions] == [(("data",), block)], reductions
