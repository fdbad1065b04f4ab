"""Ring collectives (shardlib.parallel.collectives) against jax.lax, and their volumes in the compiled HLO.

One jitted program per (mesh case, dtype) runs every ring collective, in both
step forms (unrolled and ``fori_loop``), beside its lax counterpart, over ONE
axis of a two-axis mesh whose other axis carries different data. Integers and
small-integer bf16 values sum exactly in any order, so those comparisons are
exact; float32 sums differ from lax's only by summation order.

The same compiled programs feed the HLO checks: every ring moves exactly the
bandwidth-optimal bytes per device, in the expected number of
collective-permute steps (a loop's steps counted through its trip count).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from shardlib.analysis import hlo
from shardlib.parallel import collectives as C
from tests.support import mesh_of

LOCAL = (8, 16)  # every device's array: divides into 8 blocks along dim 0, 16 blocks when flattened
ODD = (3, 5)  # 15 values: the flattening rings pad it

# name: (ring, lax reference, kwargs, collective-permute steps as a function of N, optimal bytes / local bytes)
RINGS = {
    "all_gather": (C.ring_all_gather, lax.all_gather, {"tiled": True}, lambda n: n - 1, lambda n: n - 1),
    "all_gather_stacked": (C.ring_all_gather, lax.all_gather, {"axis": 1}, lambda n: n - 1, lambda n: n - 1),
    "reduce_scatter": (
        C.ring_reduce_scatter,
        lax.psum_scatter,
        {"tiled": True},
        lambda n: n - 1,
        lambda n: (n - 1) / n,
    ),
    "reduce_scatter_dim1": (
        C.ring_reduce_scatter,
        lax.psum_scatter,
        {"scatter_dimension": 1, "tiled": True},
        lambda n: n - 1,
        lambda n: (n - 1) / n,
    ),
    "all_reduce": (C.ring_all_reduce, lax.psum, {}, lambda n: 2 * (n - 1), lambda n: 2 * (n - 1) / n),
    # Two messages per step, one each way.
    "bidirectional_all_reduce": (
        C.bidirectional_all_reduce,
        lax.psum,
        {},
        lambda n: 4 * (n - 1),
        lambda n: 2 * (n - 1) / n,
    ),
    "all_to_all": (
        C.ring_all_to_all,
        lax.all_to_all,
        {"split_axis": 0, "concat_axis": 1, "tiled": True},
        lambda n: n - 1,
        lambda n: (n - 1) / n,
    ),
    "broadcast": (C.ring_broadcast, C.lax_broadcast, {"root": 1}, lambda n: 2 * (n - 1), lambda n: 2 * (n - 1) / n),
    "scatter": (C.ring_scatter, C.lax_scatter, {"root": 1}, lambda n: n - 1, lambda n: (n - 1) / n),
    "gather": (C.ring_gather, C.lax_gather, {"root": 1}, lambda n: n - 1, lambda n: n - 1),
    "reduce": (C.ring_reduce, C.lax_reduce, {"root": 1}, lambda n: 2 * (n - 1), lambda n: 2 * (n - 1) / n),
}
PADDED = ("all_reduce", "bidirectional_all_reduce", "broadcast", "reduce")  # also run on ODD-shaped arrays
LOOPS = [name for name, (ring, *_) in RINGS.items() if ring is not C.ring_all_to_all]  # all-to-all is always unrolled

# (axis reduced over, mesh sizes): N = 2 and 4 on the inner axis, 4 on the outer one, 8 over both at once.
CASES = {
    "model2": ("model", {"data": 4, "model": 2}),
    "data4": ("data", {"data": 4, "model": 2}),
    "model4": ("model", {"data": 2, "model": 4}),
    "data_model8": (("data", "model"), {"data": 2, "model": 4}),
}
# (case, dtype, step forms). Compile time grows with the unrolled steps, so N = 8 runs the loop
# form (one step body) and the unrolled form is checked at N = 2 and 4: the two forms share
# their step function and differ only in how it is iterated.
PARAMS = [
    ("model2", "float32", ("unrolled", "loop")),
    ("data4", "float32", ("unrolled", "loop")),
    ("data_model8", "float32", ("loop",)),
    ("model4", "bfloat16", ("unrolled",)),
    ("data_model8", "int32", ("loop",)),
]
IDS = [f"{case}-{dtype}" for case, dtype, _ in PARAMS]


def _scope(name: str, loop: bool) -> str:
    return f"ring__{name}" + ("__loop" if loop else "")


def _forms(name: str, forms: tuple[str, ...]) -> tuple[str, ...]:
    return forms if name in LOOPS else ("unrolled",)


def _step_kwargs(name: str, form: str) -> dict:
    return {"unroll": form == "unrolled"} if name in LOOPS else {}


def _body(x, axis_name, *, forms: tuple[str, ...]):
    """Every ring (in named scopes, for attributing HLO ops) and every lax reference.

    Each ring gets its own input (x + i; twice that for the loop form), or
    XLA would merge identical steps of two rings. Doubling is exact, so the
    loop form is checked against twice the reference.
    """
    out = {}
    odd = x[: ODD[0], : ODD[1]]
    for i, (name, (ring, ref, kwargs, _, _)) in enumerate(RINGS.items()):
        xi = x + i
        out[name + "/ref"] = ref(xi, axis_name, **kwargs)
        for form in _forms(name, forms):
            loop = form == "loop"
            with jax.named_scope(_scope(name, loop)):
                out[f"{name}/{form}"] = ring(xi * 2 if loop else xi, axis_name, **_step_kwargs(name, form), **kwargs)
        if name in PADDED:
            out[name + "/odd"] = ring(odd + i, axis_name, **_step_kwargs(name, forms[0]), **kwargs)
            out[name + "/odd_ref"] = ref(odd + i, axis_name, **kwargs)
    return out


def _input(sizes: dict, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(len(dtype) * 10 + sizes["data"])
    shape = (sizes["data"], sizes["model"], *LOCAL)
    if dtype == "float32":
        return rng.normal(size=shape).astype(np.float32)
    # Small integers (|x + i| <= 20, sums of 8 <= 160): exact in bf16 and int32, whatever the order.
    return rng.integers(-8, 9, size=shape).astype(jnp.dtype(dtype))


@functools.cache
def _run(case: str, dtype: str, forms: tuple[str, ...]):
    """(input, outputs on the host, compiled HLO text); compiled once per case."""
    axis, sizes = CASES[case]
    mesh = mesh_of(**sizes)
    fn = C.on_mesh(_body, mesh, axis, forms=forms)
    x = _input(sizes, dtype)
    compiled = fn.lower(x).compile()
    return x, jax.device_get(compiled(x)), compiled.as_text()


def _axis_size(case: str) -> int:
    axis, sizes = CASES[case]
    return math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis))


@pytest.mark.parametrize("case,dtype,forms", PARAMS, ids=IDS)
def test_rings_match_lax(case, dtype, forms):
    x, out, _ = _run(case, dtype, forms)
    for name in RINGS:
        checks = [(f"{name}/{form}", name + "/ref", 2 if form == "loop" else 1) for form in _forms(name, forms)]
        if name in PADDED:
            checks.append((name + "/odd", name + "/odd_ref", 1))
        for key, ref, scale in checks:
            got, want = out[key], out[ref] * np.asarray(scale, out[ref].dtype)
            assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, want.shape)
            if dtype == "float32":
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=key)
            else:
                np.testing.assert_array_equal(got, want, err_msg=key)
    # lax.psum is the reference above; check the harness itself against numpy, so that an
    # on_mesh that mixed up the axes could not pass by being wrong for both.
    axis, _ = CASES[case]
    reduce_dims = tuple(i for i, a in enumerate(("data", "model")) if a in ((axis,) if isinstance(axis, str) else axis))
    total = np.sum(x.astype(np.float64) + list(RINGS).index("all_reduce"), axis=reduce_dims, keepdims=True)
    np.testing.assert_allclose(out["all_reduce/ref"].astype(np.float64), np.broadcast_to(total, x.shape), rtol=1e-5)
    assert not np.array_equal(x[0], x[-1]) or x.shape[0] == 1, "the other axis must carry different data"


@pytest.mark.parametrize("case,dtype,forms", PARAMS, ids=IDS)
def test_rings_move_the_optimal_volume(case, dtype, forms):
    """Bytes per device from the compiled HLO = the bandwidth-optimal volume, in N-1 (or 2(N-1)) steps."""
    _, _, text = _run(case, dtype, forms)
    n = _axis_size(case)
    found = hlo.collectives(text)
    local_bytes = math.prod(LOCAL) * jnp.dtype(dtype).itemsize
    for name, (_, _, _, steps, optimal) in RINGS.items():
        for loop in [form == "loop" for form in _forms(name, forms)]:
            mine = [c for c in found if _scope(name, loop) + "/" in c.op_name]
            assert {c.kind for c in mine} == {"collective-permute"}, (name, loop, {c.kind for c in mine})
            # Every one of the 8 devices sends in every step (the other axis runs its own rings).
            assert all(c.trip_count_known and c.group_size == 8 for c in mine), (name, loop)
            executions = sum(c.executions for c in mine)
            sent = sum(c.total_bytes for c in mine)
            assert executions == steps(n), f"{name} (loop={loop}): {executions} steps, expected {steps(n)}"
            assert sent == optimal(n) * local_bytes, f"{name} (loop={loop}): {sent} bytes, optimal {optimal(n)}"
            if loop and n > 2:  # a fori_loop of one step is inlined by XLA
                assert len(mine) < executions, f"{name}: the loop form should hold its step once, inside a while"
            if not loop:
                assert len(mine) == executions, f"{name}: the unrolled form should show every step"


def test_hlo_parser_multiplies_nested_trip_counts():
    text = """HloModule m

%inner (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  %a = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = bf16[4,8]{1,0} collective-permute(%a), channel_id=1, source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(f)/ring/ppermute"}
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %cp)
}

%outer (q: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %q = (s32[], bf16[4,8]{1,0}) parameter(0)
  %w = (s32[], bf16[4,8]{1,0}) while(%q), condition=%c, body=%inner, backend_config={"known_trip_count":{"n":"5"}}
  %unknown = (s32[], bf16[4,8]{1,0}) while(%q), condition=%c, body=%loose
  ROOT %ar = f32[16]{0} all-reduce(%x), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
}

%loose (r: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %ag = f32[8,2]{1,0} all-gather(%y), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}
}

ENTRY %main (x: f32[4,8]) -> f32[4] {
  %x = f32[4,8]{1,0} parameter(0)
  %p = f32[2]{0} parameter(1)
  %q = bf16[4]{0} parameter(2)
  %r = f32[4]{0} parameter(3)
  %s = f32[6]{0} parameter(4)
  %s0 = f32[2,1]{1,0} parameter(5)
  %s1 = f32[2,1]{1,0} parameter(6)
  %s2 = f32[2,1]{1,0} parameter(7)
  %loop = (s32[], bf16[4,8]{1,0}) while(%init), condition=%c2, body=%outer, backend_config={"known_trip_count":{"n":"3"}}
  %a2a = (f32[2,1]{1,0}, f32[2,1]{1,0}, f32[2,1]{1,0}) all-to-all(%s0, %s1, %s2), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=3] {'axis_1'}
  %cps = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=5, source_target_pairs={{0,1},{1,2},{2,0}}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cps)
  %ags = ((f32[2]{0}, bf16[4]{0}), (f32[8]{0}, bf16[16]{0})) all-gather-start(%p, %q), channel_id=6, replica_groups=[2,4]<=[8], dimensions={0}
  %ars = (f32[4]{0}, f32[6]{0}) all-reduce-start(%r, %s), channel_id=7, replica_groups={{0,1}}, to_apply=%add
  %ard = (f32[4]{0}, f32[6]{0}) all-reduce-done(%ars)
}
"""
    found = {c.name: c for c in hlo.collectives(text)}
    assert set(found) == {"cp", "ar", "ag", "a2a", "cps", "ags", "ars"}
    # GPU-style async starts: the results, not the operands or the u32 contexts.
    assert (found["cps"].kind, found["cps"].bytes, found["cps"].group_size) == ("collective-permute", 128, 3)
    assert (found["ags"].kind, found["ags"].bytes, found["ags"].group_size) == ("all-gather", 64, 4)
    assert (found["ars"].kind, found["ars"].bytes, found["ars"].group_size) == ("all-reduce", 40, 2)
    cp, ar, ag, a2a = found["cp"], found["ar"], found["ag"], found["a2a"]
    assert (cp.kind, cp.bytes, cp.executions, cp.group_size, cp.op_name) == (
        "collective-permute",
        64,
        15,
        2,
        "jit(f)/ring/ppermute",
    )
    assert (ar.bytes, ar.executions, ar.group_size, ar.wire_bytes) == (64, 3, 4, 2 * 64 * 3 / 4)
    assert (ag.executions, ag.trip_count_known, ag.group_size) == (3, False, 4)
    assert (a2a.bytes, a2a.executions, a2a.group_size) == (24, 1, 3)
    summary = hlo.summarize(c for c in found.values() if c.name != "cps")
    # A permute's wire bytes are the mean over the devices: 2 of the module's 8 send 64 bytes, 15 times.
    assert summary["collective-permute"] == {"count": 1, "executions": 15, "bytes": 960, "wire_bytes": 960 * 2 / 8}


def test_ring_inside_a_users_shard_map_with_vma_checks():
    """The rings are plain functions of a shard_map body: they compose with lax ops and typed (VMA) outputs."""
    mesh = mesh_of(data=2, model=4)
    spec = jax.sharding.PartitionSpec("data", "model")

    def body(x):
        total = C.ring_all_reduce(x * 2, "model", unroll=False)
        return total - 2 * lax.psum(x, "model")

    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))(x)
    np.testing.assert_array_equal(np.asarray(out), 0)
