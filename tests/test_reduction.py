"""shardlib.parallel.reduction on its own: gradients equal the partitioner's, collectives are the minimum.

One weight use, x_BxLxD @ w_DxF, on 8 emulated devices: FSDP (w split over
``data``), data x seq (w replicated, tokens over both) and HSDP-shaped
(w split over ``seq`` standing in for the in-host part, tokens over both).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.analysis.report.collectives import find_collectives
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.models.layers import WEIGHT_USES
from shardlib.parallel.reduction import ReducedWeightUse, lookup_gathers_table, reduce_deferred
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


def _table_grad_fn(mesh, use, table_spec, ids_spec):
    sharding = NamedSharding(mesh, table_spec)
    return jax.jit(
        jax.grad(lambda t, i: jnp.sum(jnp.sin(use("embedding", i, t)))),
        in_shardings=(sharding, NamedSharding(mesh, ids_spec)),
        out_shardings=sharding,
    )


def test_a_table_larger_than_the_tokens_stays_sharded_and_the_ids_travel():
    """HSDP x TP (data_replica 2 x data 2 x model 2), 256 rows against 16 tokens a device: the ids are
    gathered over ``data`` and the rows all-to-all'd both ways, no collective is table-sized but the one
    all-reduce of the device's own block over ``data_replica`` (the slow axis moves the least)."""
    mesh = mesh_of(data_replica=2, data=2, model=2)
    table_spec, ids_spec = P("model", "data"), P(("data_replica", "data"))
    table_VxD = jnp.asarray(np.random.default_rng(2).normal(size=(256, 16)), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (8, 8)), jnp.int32)  # 16 tokens a device
    rows = ("data_replica", "data")
    use = ReducedWeightUse(mesh, WEIGHT_USES, {"embedding": table_spec}, _activation_spec(rows, ()), rows)
    fn = _table_grad_fn(mesh, use, table_spec, ids_spec)
    plain = jax.grad(lambda t, i: jnp.sum(jnp.sin(jnp.take(t, i, axis=0))))(table_VxD, ids)
    assert_trees_close(fn(table_VxD, ids), plain, what="table gradient")
    forward = jax.jit(lambda t, i: use("embedding", i, t))(table_VxD, ids)
    assert_trees_close(forward, jnp.take(table_VxD, ids, axis=0), what="rows")

    found = find_collectives(parse_hlo(fn.lower(table_VxD, ids).compile().as_text()), dict(mesh.shape))
    block = table_VxD.size * 4 // 4  # a device's [V / model, D / data] block
    table_sized = sorted((c.kind, c.axes) for c in found if c.buffer_bytes >= block)
    assert table_sized == [("all-reduce", ("data_replica",))], found
    kinds = {(c.kind, c.axes) for c in found}
    assert {("all-gather", ("data",)), ("all-to-all", ("data",))} <= kinds, found
    assert sum(c.count for c in found if c.kind == "all-to-all") == 2  # rows there, their gradients back


def test_a_deferred_gradient_is_each_devices_partial_until_reduce_deferred():
    """``deferred``: the all-reduce over the axes a weight is not split over waits for ``reduce_deferred``,
    so summing two microbatches' partials and reducing once equals the sum of both reduced gradients."""
    mesh = mesh_of(data=2, seq=4)
    w_DxF = jax.random.normal(jax.random.key(4), (32, 32)) / 4
    xs = jax.random.normal(jax.random.key(5), (2, 8, 16, 32))
    spec, rows, positions = P(), ("data",), ("seq",)
    eager = ReducedWeightUse(mesh, WEIGHT_USES, {"unembed": spec}, _activation_spec(rows, positions), rows, positions)
    deferred = ReducedWeightUse(
        mesh, WEIGHT_USES, {"unembed": spec}, _activation_spec(rows, positions), rows, positions, deferred=True
    )
    w_sharding = NamedSharding(mesh, spec)
    xs_sharding = NamedSharding(mesh, P(None, rows, positions))

    def summed(use, finish):
        def fn(w, xs):
            g = jax.grad(_loss(use))(w, xs[0]) + jax.grad(_loss(use))(w, xs[1])
            return finish(g)

        return jax.jit(fn, in_shardings=(w_sharding, xs_sharding), out_shardings=w_sharding)

    reference = summed(eager, lambda g: g)(w_DxF, xs)
    once = summed(deferred, lambda g: reduce_deferred(g, spec, mesh, rows + positions))
    assert_trees_close(once(w_DxF, xs), reference, what="two microbatches reduced once")
    found = find_collectives(parse_hlo(once.lower(w_DxF, xs).compile().as_text()), dict(mesh.shape))
    assert [(c.kind, c.axes, c.count) for c in found if c.buffer_bytes >= w_DxF.size * 4] == [
        ("all-reduce", ("data", "seq"), 1)
    ], found
    # Without the final reduction the result is one device's partial sum, not the gradient.
    partial = summed(deferred, lambda g: g)(w_DxF, xs)
    assert not np.allclose(np.asarray(partial), np.asarray(reference), rtol=1e-2)


def test_reductions_carry_the_reduce_dtype_the_use_is_given():
    """``reduce_dtype``: the program asks for bf16 reduce-scatters and all-reduces (what a GPU sends) and
    returns the gradient in the weight's float32. Only the StableHLO is checked: XLA:CPU rewrites bf16
    reductions as float32 (AllReducePromotion), and in a partly manual ``shard_map`` that pass aborts
    (jaxlib 0.10.2: "Invalid binary instruction opcode copy"), so the plan never asks for them there."""
    sizes, rows, positions, spec, _ = CASES["shard_then_replicas"]
    mesh = mesh_of(**sizes)
    keys = jax.random.split(jax.random.key(6), 2)
    w_DxF, x_BxLxD = jax.random.normal(keys[0], (32, 32)) / 4, jax.random.normal(keys[1], (8, 16, 32))
    w_sharding, x_sharding = NamedSharding(mesh, spec), NamedSharding(mesh, P(rows, positions))

    def grad_fn(reduce_dtype):
        use = ReducedWeightUse(
            mesh,
            WEIGHT_USES,
            {"unembed": spec},
            _activation_spec(rows, positions),
            rows,
            positions,
            reduce_dtype=reduce_dtype,
        )
        return jax.jit(jax.grad(_loss(use)), in_shardings=(w_sharding, x_sharding), out_shardings=w_sharding)

    exact, rounded = grad_fn(None), grad_fn(jnp.bfloat16)

    def carried(fn):  # {(op, operand type)} of the program's reductions, as it asks for them
        text = fn.lower(w_DxF, x_BxLxD).as_text()
        return set(re.findall(r'"stablehlo\.(reduce_scatter|all_reduce)".*?\}\) : \((tensor<[^>]*>)', text, re.DOTALL))

    assert {op for op, _ in carried(rounded)} == {"reduce_scatter", "all_reduce"}
    assert all(t.endswith("xbf16>") for _, t in carried(rounded)), carried(rounded)
    assert all(t.endswith("xf32>") for _, t in carried(exact)), carried(exact)
    assert rounded.eval_shape(w_DxF, x_BxLxD).dtype == jnp.float32
