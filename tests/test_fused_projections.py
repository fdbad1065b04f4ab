"""Checkpoints from before the fused projections: how a checkpoint's layout is told, and the conversion.

The end-to-end case (a rewritten checkpoint resuming with the uninterrupted run's losses) is in
tests/test_checkpoint.py; here the pieces, without training.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.training.fused_projections import (
    FUSED,
    PROJECTIONS,
    SEPARATE,
    fuse_separate,
    saved_projections,
    separate_targets,
)
from tests.support import mesh_of

R, L, D, N, G, K, F = 2, 3, 8, 2, 3, 4, 6  # replicas, layers, width, kv heads, queries per kv head, head_dim, d_ff


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({PROJECTIONS: FUSED}, FUSED),
        ({PROJECTIONS: SEPARATE}, SEPARATE),
        ({"checksums": {"arrays": {"params/layers/qkv": "f", "opt_state/1/0/mu/layers/qkv": "f"}}}, FUSED),
        ({"checksums": {"arrays": {"params/layers/q": "f", "params/layers/k": "f"}}}, SEPARATE),
        ({"step": 5, "data_position": 5}, SEPARATE),  # older than checksums: older than the fusion
    ],
    ids=["recorded-fused", "recorded-separate", "paths-fused", "paths-separate", "no-record"],
)
def test_the_saved_layout_is_read_from_the_meta(meta, expected):
    assert saved_projections(meta) == expected


def _separate_layers(rng, lead=()):
    shapes = {"q": (D, N * G, K), "k": (D, N, K), "v": (D, N, K), "gate": (D, F), "up": (D, F), "o": (N * G, K, D)}
    return {name: rng.standard_normal((*lead, L, *shape)).astype(np.float32) for name, shape in shapes.items()}


def test_fusing_puts_each_query_head_with_its_kv_head_and_keeps_leading_axes():
    """Query head h = n * G + g lands in slot g of kv head n, k and v in slots G and G + 1, gate and up at 0 and 1;
    a leading replica axis (DiLoCo) and leaves that are not projections pass through."""
    layers = _separate_layers(np.random.default_rng(0), lead=(R,))
    fused = fuse_separate({"layers": layers, "embed": {"embedding": np.ones(3)}})
    qkv, gate_up = np.asarray(fused["layers"]["qkv"]), np.asarray(fused["layers"]["gate_up"])
    assert qkv.shape == (R, L, D, N, G + 2, K) and gate_up.shape == (R, L, D, 2, F)
    assert set(fused["layers"]) == {"qkv", "gate_up", "o"}
    for h in range(N * G):
        np.testing.assert_array_equal(qkv[..., h // G, h % G, :], layers["q"][..., h, :])
    np.testing.assert_array_equal(qkv[..., G, :], layers["k"])
    np.testing.assert_array_equal(qkv[..., G + 1, :], layers["v"])
    np.testing.assert_array_equal(gate_up[..., 0, :], layers["gate"])
    np.testing.assert_array_equal(gate_up[..., 1, :], layers["up"])
    np.testing.assert_array_equal(fused["layers"]["o"], layers["o"])
    np.testing.assert_array_equal(fused["embed"]["embedding"], np.ones(3))


def test_targets_take_the_fused_shardings_and_the_conversion_keeps_them():
    """The separate target of qkv [L, D@data, N@model, G+2, K] is q [L, D@data, H@model, K] (a device's kv heads
    and their queries), k and v alike; gate_up's is gate, up [L, D@data, F@model]. Converted, the fused leaves
    land where the fused targets are, inside optax states too (MaskedNode leaves pass)."""
    mesh = mesh_of(data=2, model=2)

    def sds(shape, *spec):
        return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, P(*spec)))

    fused = {
        "qkv": sds((L, D, N, G + 2, K), None, "data", "model", None, None),
        "gate_up": sds((L, D, 2, F), None, "data", None, "model"),
        "attn_norm": optax.MaskedNode(),
    }
    targets = separate_targets({"mu": {"layers": fused}})["mu"]["layers"]
    assert targets["q"].shape == (L, D, N * G, K) and targets["q"].sharding.spec == P(None, "data", "model", None)
    assert targets["k"].shape == targets["v"].shape == (L, D, N, K)
    assert targets["k"].sharding.spec == P(None, "data", "model", None)
    assert targets["gate"].shape == (L, D, F) and targets["up"].sharding.spec == P(None, "data", "model")
    assert isinstance(targets["attn_norm"], optax.MaskedNode)

    rng = np.random.default_rng(1)
    with jax.set_mesh(mesh):
        restored = {
            name: jax.device_put(rng.standard_normal(t.shape).astype(np.float32), t.sharding)
            for name, t in targets.items()
            if name != "attn_norm"
        }
        state = optax.ScaleByAdamState(count=np.zeros((), np.int32), mu={"layers": restored}, nu={"layers": restored})
        converted = fuse_separate(state)
    for name in ("qkv", "gate_up"):
        leaf = converted.mu["layers"][name]
        assert leaf.shape == fused[name].shape and leaf.sharding.spec == fused[name].sharding.spec, name


def test_a_stack_without_dense_mlps_converts_too():
    """MoE with period 1: every MLP is an expert, the layer stack holds no gate/up."""
    layers = {k: v for k, v in _separate_layers(np.random.default_rng(2)).items() if k not in ("gate", "up")}
    fused = fuse_separate({"layers": layers})["layers"]
    assert set(fused) == {"qkv", "o"}
    fused_targets = {"qkv": jax.ShapeDtypeStruct((L, D, N, G + 2, K), np.float32)}
    assert set(separate_targets({"layers": fused_targets})["layers"]) == {"q", "k", "v"}
