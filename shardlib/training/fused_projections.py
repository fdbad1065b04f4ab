"""Checkpoints from before q/k/v and gate/up were fused: restored in their own layout, then converted.

Until the fusion (``shardlib.models.layers`` says why it was done) every layer stack
held five projection weights; now it holds two:

  separate (before)                       fused (now)
  q [..., D, H, K], k, v [..., D, N, K]   qkv [..., D, N, G + 2, K]   (G = H / N; slots: G queries, k, v)
  gate, up [..., D, F]                    gate_up [..., D, 2, F]

(``...`` is the ``layers`` axis, and DiLoCo's replica axis before it.) A
checkpoint says which it holds (``saved_projections``): new ones record
``projections: fused`` in their meta; an older one is read off the array paths
its checksums list, and one older still (no checksums) predates the fusion.
A separate checkpoint is restored onto targets of its own shapes
(``separate_targets``: the same shardings, the slot dimension dropped), then
concatenated into the fused layout (``fuse_separate``). The conversion is
exact for the parameters and for every optimizer leaf that mirrors them
(AdamW's moments are elementwise), so a run resumes where it stopped. Anything
else that depends on the order of the parameter leaves (compressed-gradient
residuals, flattened over the leaves in path order) cannot be converted and
restarts from zero (``shardlib.training.state_layout.reset_foreign_residuals``).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.models.layers import fuse_gate_up, fuse_qkv  # the layout's one definition, as the model builds it
from shardlib.training.checkpoint_integrity import CHECKSUMS

PyTree = Any
PROJECTIONS = "projections"  # the meta key
FUSED, SEPARATE = "fused", "separate"
QKV, GATE_UP = "qkv", "gate_up"
SEPARATE_NAMES = {QKV: ("q", "k", "v"), GATE_UP: ("gate", "up")}


def saved_projections(meta: dict) -> str:
    """``FUSED`` or ``SEPARATE``: the layout of the projections in a checkpoint, from what it recorded.

    ``meta`` as ``Checkpointer.read_meta`` returns it: checked against the step's file digests, and
    refused when it lacks the checksums its version records, so that a meta without checksums here
    really is one from before them (``shardlib.training.checkpoint_integrity``).
    """
    if PROJECTIONS in meta:
        return meta[PROJECTIONS]
    arrays = (meta.get(CHECKSUMS) or {}).get("arrays")
    if arrays:  # checksummed but older than the key: the paths say
        return SEPARATE if any(path.endswith("layers/q") for path in arrays) else FUSED
    return SEPARATE  # older than checksums, so older than the fusion


def _is_fused_layers(node) -> bool:
    return isinstance(node, dict) and QKV in node


def _is_separate_layers(node) -> bool:
    return isinstance(node, dict) and "q" in node and QKV not in node


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _spec(x) -> tuple:
    """x's PartitionSpec entries, one per dimension (a shorter spec padded with None; no mesh: all None)."""
    sharding = getattr(x, "sharding", None)
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    return spec + (None,) * (len(x.shape) - len(spec))


def _abstract(shape, like, spec: tuple):
    """A ShapeDtypeStruct of ``shape`` in ``like``'s dtype, on ``like``'s mesh with ``spec`` (if it has one)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.ShapeDtypeStruct(shape, like.dtype, sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)))
    return jax.ShapeDtypeStruct(shape, like.dtype, sharding=sharding)


def _split_targets(node: dict) -> dict:
    """One fused layer-stack node as abstract separate leaves (non-array leaves, e.g. optax's MaskedNode, copied)."""
    out = {k: v for k, v in node.items() if k not in (QKV, GATE_UP)}
    qkv = node[QKV]
    if _is_array(qkv):
        *lead, d, n, slots, k = qkv.shape
        spec = _spec(qkv)[:-2] + _spec(qkv)[-1:]  # the slot dimension is never split: drop it
        out["q"] = _abstract((*lead, d, n * (slots - 2), k), qkv, spec)
        out["k"] = out["v"] = _abstract((*lead, d, n, k), qkv, spec)
    else:
        out.update(dict.fromkeys(SEPARATE_NAMES[QKV], qkv))
    if GATE_UP in node:
        gate_up = node[GATE_UP]
        if _is_array(gate_up):
            *lead, d, _, f = gate_up.shape
            spec = _spec(gate_up)[:-2] + _spec(gate_up)[-1:]
            out["gate"] = out["up"] = _abstract((*lead, d, f), gate_up, spec)
        else:
            out.update(dict.fromkeys(SEPARATE_NAMES[GATE_UP], gate_up))
    return out


def separate_targets(tree: PyTree) -> PyTree:
    """A restore target (params, or an optimizer state mirroring them) in the separate layout.

    Every dict holding ``qkv`` (a layer stack, in the parameters and in each
    moment) gets q, k, v (and gate, up for ``gate_up``) in its place, sharded
    as the fused leaf is: q's heads over the mesh axes of the kv heads (a
    device's kv heads and their queries), gate and up as ``gate_up``'s ``mlp``.
    """
    return jax.tree.map(lambda x: _split_targets(x) if _is_fused_layers(x) else x, tree, is_leaf=_is_fused_layers)


def _fused_sharding(like: jax.Array):
    """``like``'s sharding with an unsplit dimension inserted before the last (the slot dimension)."""
    spec = _spec(like)
    return NamedSharding(like.sharding.mesh, PartitionSpec(*spec[:-1], None, spec[-1]))


def _combine(fn, parts: list):
    """``fn(*parts)`` as one jitted op on the parts' mesh (the slot dimension unsplit); non-arrays pass through."""
    if not all(_is_array(p) for p in parts):
        return parts[0]
    if isinstance(getattr(parts[-1], "sharding", None), NamedSharding):
        return jax.jit(fn, out_shardings=_fused_sharding(parts[-1]))(*parts)
    return jax.jit(fn)(*parts)


def _fuse_node(node: dict) -> dict:
    out = {k: v for k, v in node.items() if k not in ("q", "k", "v", "gate", "up")}
    out[QKV] = _combine(fuse_qkv, [node[n] for n in SEPARATE_NAMES[QKV]])
    if "gate" in node:
        out[GATE_UP] = _combine(fuse_gate_up, [node[n] for n in SEPARATE_NAMES[GATE_UP]])
    return out


def fuse_separate(tree: PyTree) -> PyTree:
    """A restored separate-layout tree (params or optimizer state) in the fused layout, exactly.

    Each fused leaf is placed as its parts were (a device that held kv head
    n's k and v and its queries gets its slots of qkv): the concatenation
    moves nothing between devices.
    """
    return jax.tree.map(lambda x: _fuse_node(x) if _is_separate_layers(x) else x, tree, is_leaf=_is_separate_layers)
