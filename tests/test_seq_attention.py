"""``shardlib.parallel.seq_attention.dot_product_attention`` against ``jax.nn.dot_product_attention`` on one device.

Every impl x {causal, bidirectional} x {no bias, bias} x {no segments, packed documents}, and
causal by (permuted) positions: the output and the gradients of q, k, v and the bias, inside a
user's jitted function, float32, 1e-5 of each leaf's scale. Ring and all-gather also on a project's
own mesh ({"sp": 4, "dp": 2}, explicit axes, explicit-mode mesh from ``jax.set_mesh``), on seq 8,
and inside a user's own shard_map (context (b)); grouped-query heads (N < H) throughout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from shardlib.core.rules import preset_rules
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.seq_attention import dot_product_attention
from tests.support import assert_trees_close, mesh_of

TOLERANCE = 1e-5
B, L, H, N, K = 2, 16, 4, 2, 8


@functools.cache
def _inputs(seed: int = 0, bias_shape=(1, H, L, L)):
    """q, k, v, bias, output weight, packed segment ids [B, L], positions restarting per document."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, L, H, K), np.float32)
    k = rng.standard_normal((B, L, N, K), np.float32)
    v = rng.standard_normal((B, L, N, K), np.float32)
    bias = rng.standard_normal(bias_shape, np.float32)
    weight = rng.standard_normal((B, L, H, K), np.float32)
    starts = [(0, 5, 11), (0, 3, 4, 12)]  # documents of 5, 6, 5 and 3, 1, 8, 4 tokens
    segments = np.zeros((B, L), np.int32)
    for row, row_starts in enumerate(starts):
        for s in row_starts[1:]:
            segments[row, s:] += 1
    restart = np.stack(
        [np.maximum.accumulate(np.where(np.diff(s, prepend=-1) != 0, np.arange(L), 0)) for s in segments]
    )
    positions = (np.arange(L)[None] - restart).astype(np.int32)
    return q, k, v, bias, weight, segments, positions


def _permuted_positions(seed: int = 1) -> np.ndarray:
    """Tokens stored out of order: causal by position differs from causal by index (and per row)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(L) for _ in range(B)]).astype(np.int32)


def _reference(causal: bool, with_bias: bool, mask_by: str | None, bias_shape=(1, H, L, L)):
    """jax.nn.dot_product_attention on one device: the output and the gradients of q, k, v (and bias)."""
    q, k, v, bias, weight, segments, _ = _inputs(bias_shape=bias_shape)
    mask = None
    if mask_by == "segments":
        mask = segments[:, :, None] == segments[:, None, :]
    is_causal = causal
    if mask_by == "positions":
        pos = _permuted_positions()
        mask, is_causal = pos[:, :, None] >= pos[:, None, :], False
    mask = None if mask is None else mask[:, None]

    def loss(q, k, v, bias):
        out = jax.nn.dot_product_attention(q, k, v, bias if with_bias else None, mask, is_causal=is_causal)
        return jnp.sum(out * weight), out

    device = jax.devices()[0]
    args = jax.device_put((q, k, v, bias), device)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return _named(out, grads, with_bias)


def _named(out, grads, with_bias):
    names = ("dq", "dk", "dv", "dbias")[: 4 if with_bias else 3]
    return np.asarray(out), {n: np.asarray(g) for n, g in zip(names, grads, strict=False)}


def _keywords(causal: bool, mask_by: str | None) -> dict:
    _, _, _, _, _, segments, positions = _inputs()
    if mask_by == "segments":
        # Packed documents: segment ids, positions restarting per document (causal by them).
        extra = {"query_segment_ids": segments, "key_segment_ids": segments}
        if causal:
            extra |= {"query_positions": positions, "key_positions": positions}
        return extra
    if mask_by == "positions":
        pos = _permuted_positions()
        return {"query_positions": pos, "key_positions": pos}
    return {}


def _run(attend, causal: bool, with_bias: bool, mask_by: str | None, bias_shape=(1, H, L, L)):
    """``attend(q, k, v, bias, **masks)`` inside the user's jitted loss: output and gradients."""
    q, k, v, bias, weight, *_ = _inputs(bias_shape=bias_shape)
    masks = _keywords(causal, mask_by)

    def loss(q, k, v, bias, masks):
        out = attend(q, k, v, bias if with_bias else None, is_causal=causal, **masks)
        return jnp.sum(out * weight), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias, masks)
    return _named(out, grads, with_bias)


def _assert_matches(got, expected):
    assert_trees_close(got[0], expected[0], rel=TOLERANCE, what="output")
    assert_trees_close(got[1], expected[1], rel=TOLERANCE, what="gradient")


CASES = [
    (causal, with_bias, mask_by)
    for causal in (False, True)
    for with_bias in (False, True)
    for mask_by in (None, "segments")
] + [(True, False, "positions"), (True, True, "positions")]


def _case_id(case):
    causal, with_bias, mask_by = case
    return f"{'causal' if causal else 'bidirectional'}-{'bias' if with_bias else 'nobias'}-{mask_by or 'nomask'}"


@functools.cache
def _shardlib_mesh():
    return ActivationSharding(preset_rules("dp"), mesh_of(seq=4, data=2))


@pytest.mark.parametrize("impl", ["ring", "allgather", "dense", "fused"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_jax_on_one_device(impl, case):
    """seq 4 x data 2 through shardlib's rules (``fused``: data 2, the whole sequence per device)."""
    shard = _shardlib_mesh() if impl != "fused" else ActivationSharding(preset_rules("dp"), mesh_of(data=2))
    attend = functools.partial(dot_product_attention, impl=impl, rules=shard)
    _assert_matches(_run(attend, *case), _reference(*case))


@functools.cache
def _own_mesh():
    """A project's own mesh and names, explicit-mode axes (jax.make_mesh's default)."""
    return jax.make_mesh((4, 2), ("sp", "dp"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:8])


@pytest.mark.parametrize("impl", ["ring", "allgather"])
def test_own_mesh_explicit_axes_from_the_context(impl):
    """Axes named explicitly, the mesh from ``jax.set_mesh``; a per-row, per-head-shared bias [B, 1, L, M]."""
    case = (True, True, "segments")
    attend = functools.partial(dot_product_attention, impl=impl, seq_axis="sp", batch_axes="dp")
    with jax.set_mesh(_own_mesh()):
        got = _run(attend, *case, bias_shape=(B, 1, L, L))
    _assert_matches(got, _reference(*case, bias_shape=(B, 1, L, L)))


def test_ring_on_seq8_bidirectional_with_bias_and_segments():
    """One token per ring chunk: every tile is a block edge."""
    case = (False, True, "segments")
    attend = functools.partial(dot_product_attention, impl="ring", mesh=mesh_of(seq=8), seq_axis="seq")
    _assert_matches(_run(attend, *case), _reference(*case))


@pytest.mark.parametrize("impl", ["ring", "allgather", "dense"])
def test_inside_a_users_shard_map(impl):
    """Context (b): the user's shard_map makes `sp` manual; the call gets this device's blocks.

    The bias is split over its query rows like q (its keys whole); positions and segments like q.
    """
    mesh = jax.make_mesh((4, 2), ("sp", "dp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8])
    case = (True, True, "segments")
    seq = P("dp", "sp")
    specs = {"query_segment_ids": seq, "key_segment_ids": seq, "query_positions": seq, "key_positions": seq}

    def attend(q, k, v, bias, is_causal, **masks):
        def body(q, k, v, bias, masks):
            return dot_product_attention(q, k, v, bias, is_causal=is_causal, impl=impl, seq_axis="sp", **masks)

        in_specs = (P("dp", "sp"), P("dp", "sp"), P("dp", "sp"), P(None, None, "sp"), specs)
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P("dp", "sp"))(q, k, v, bias, masks)

    _assert_matches(_run(attend, *case), _reference(*case))


def test_bad_arguments_are_named():
    q, k, v, bias, _, segments, positions = _inputs()
    shard = _shardlib_mesh()
    call = functools.partial(dot_product_attention, q, k, v, rules=shard)
    with pytest.raises(ValueError, match=r"bias of shape \(1, 4, 16, 8\) does not broadcast to \[B, H, L, M\]"):
        call(bias[..., :8])
    with pytest.raises(ValueError, match="query_segment_ids must be integers of shape"):
        call(query_segment_ids=segments.astype(np.float32), key_segment_ids=segments)
    with pytest.raises(ValueError, match=r"key_segment_ids must be integers of shape \(2, 16\)"):
        call(query_segment_ids=segments, key_segment_ids=segments[:, :8])
    with pytest.raises(ValueError, match="give query_positions and key_positions together"):
        call(query_positions=positions)
    with pytest.raises(ValueError, match=r"impl='fused' .* needs the whole sequence .* 'seq' has 4 devices"):
        call(impl="fused")
    with pytest.raises(ValueError, match=r"impl='ring' splits the query length L=12 over seq=4 .* divisible by 8"):
        dot_product_attention(q[:, :12], k[:, :12], v[:, :12], rules=shard)
    with pytest.raises(ValueError, match=r"impl='allgather' splits the key length M=10 over seq=4"):
        dot_product_attention(q[:, :8], k[:, :10], v[:, :10], impl="allgather", rules=shard)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        call(impl="flash")
    with pytest.raises(ValueError, match="pass seq_axis= .* or rules="):
        dot_product_attention(q, k, v, mesh=mesh_of(seq=4, data=2))
    with pytest.raises(ValueError, match=r"mesh axes \['sq'\] are not axes of the mesh"):
        dot_product_attention(q, k, v, mesh=mesh_of(seq=4, data=2), seq_axis="sq")
    with pytest.raises(ValueError, match="either through rules= or as seq_axis"):
        call(seq_axis="seq")
    with pytest.raises(ValueError, match="do not fit query"):
        dot_product_attention(q, k[..., :4], v[..., :4], rules=shard)
