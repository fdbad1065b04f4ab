"""Attention over a sequence sharded on the mesh, called like ``jax.nn.dot_product_attention``.

``dot_product_attention`` is the one entry point: a project's own attention
module calls it inside its own jitted step, on global arrays (or, inside a
``shard_map`` that makes the sequence axis manual, on a device's blocks), and
picks the kernel with ``impl``:

* ``ring``: ``shardlib.parallel.ring_attention``: K/V blocks rotate over the
  sequence axis, O(L/p) memory per device, its own ring backward.
* ``allgather``: ``shardlib.parallel.gather_attention``: each device
  all-gathers K and V over the sequence axis.
* ``ulysses``: ``shardlib.parallel.ulysses_attention``: all-to-alls over the
  sequence axis trade the sequence split for a head split, ``ulysses_kernel``
  (dense or fused) runs on whole sequences of H/p heads, and one more trades
  back; ``ulysses_degree`` u < p is the hybrid (all-to-alls within groups of u
  devices, the ring across the groups).
* ``fused``: ``jax.nn.dot_product_attention`` (cuDNN's flash kernel on GPUs in
  bf16/fp16, XLA's elsewhere); the whole sequence on every device.
* ``dense``: ``shardlib.parallel.dense_attention.gqa_attention``, the plain
  math, left to XLA's partitioner.

Mesh axes. Either explicit (``seq_axis``, ``batch_axes``, ``heads_axis``; the
kv heads go on the heads axis too), or the rules (``rules=``: a rule table or
an ``ActivationSharding``; logical names ``length`` -> the sequence axis,
``batch``, ``heads``, ``kv_heads``). The mesh is ``mesh``, else the
``ActivationSharding``'s, else the context's (``jax.set_mesh``; its abstract
mesh, ``jax.sharding.get_abstract_mesh()``, inside ``jit``).

Two contexts, told apart by ``jax.sharding.get_abstract_mesh().manual_axes``:
(a) the sequence axis is not manual (an ordinary jitted, auto-sharded
program): the arrays are global and ring/allgather wrap their own
``jax.shard_map``, manual over every mesh axis; (b) the sequence axis is
manual (inside a ``shard_map``, e.g. a pipeline stage of shardlib's
executor): the arrays are this device's blocks and the kernel runs directly
(``dense`` there runs as the all-gather kernel, which is what XLA makes of it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from shardlib.core.rules import LogicalAxes, MeshAxes, Rules, axes_tuple, logical_to_spec, rule_axes
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.dense_attention import gqa_attention, visible_mask
from shardlib.parallel.gather_attention import allgather_attention
from shardlib.parallel.ring_attention import DEFAULT_BLOCK_K, LAYOUTS, ring_attention
from shardlib.parallel.ulysses_attention import Attend, groups_of, ulysses_attention

IMPLS = ("ring", "allgather", "ulysses", "fused", "dense")
ULYSSES_KERNELS = ("dense", "fused")
_SHARDED = ("ring", "allgather", "ulysses")
AnyMesh = jax.sharding.Mesh | jax.sharding.AbstractMesh  # a concrete mesh, or a context's (inside a shard_map)


@dataclasses.dataclass(frozen=True)
class SequenceAxes:
    """Where attention's dimensions live: the mesh (or its abstract view), the rules, the sequence axis.

    rules: logical names (``batch``, ``length``, ``heads``, ``kv_heads``) -> mesh axes; None when
      nothing says (dense or fused on whatever sharding XLA chooses).
    seq_axis: the mesh axis the sequence is split over, or None.
    """

    mesh: AnyMesh | None
    rules: Rules | None
    seq_axis: str | None

    def size(self) -> int:
        """Devices on the sequence axis (1 without one)."""
        if self.seq_axis is None:
            return 1
        mesh = _context_or(self.mesh)
        assert mesh is not None, "a sequence axis comes with a mesh (resolve_axes)"
        return int(dict(mesh.shape)[self.seq_axis])

    def spec(self, shape: Sequence[int], logical_axes: LogicalAxes, what: str) -> PartitionSpec:
        """The spec of an array with ``logical_axes``; names the rules do not know stay whole."""
        assert self.rules is not None and self.mesh is not None, "spec() needs the axes resolve_axes gives with rules"
        known = {name for name, _ in self.rules}
        names = tuple(n if n in known else None for n in logical_axes)
        return logical_to_spec(names, self.rules, dict(self.mesh.shape), shape=shape, path=what)


def resolve_axes(
    mesh: AnyMesh | None = None,
    rules: Rules | ActivationSharding | None = None,
    seq_axis: str | None = None,
    batch_axes: MeshAxes = None,
    heads_axis: str | None = None,
) -> SequenceAxes:
    """The mesh, rules and sequence axis from explicit axes or from the rules (see the module doc)."""
    if isinstance(rules, ActivationSharding):
        mesh = rules.mesh if mesh is None else mesh
        rules = rules.rules
    if rules is not None and (seq_axis, batch_axes, heads_axis) != (None, None, None):
        raise ValueError("give the mesh axes either through rules= or as seq_axis/batch_axes/heads_axis, not both")
    if rules is None and seq_axis is not None:
        rules = (("batch", _axes_or_none(axes_tuple(batch_axes))), ("length", seq_axis))
        rules += (("heads", heads_axis), ("kv_heads", heads_axis))
    elif rules is None and (batch_axes, heads_axis) != (None, None):
        raise ValueError("batch_axes and heads_axis need seq_axis (the mesh axis the sequence is split over)")
    if mesh is None:
        context = jax.sharding.get_abstract_mesh()
        mesh = None if context.empty else context
    if rules is None:
        return SequenceAxes(mesh, None, None)
    if mesh is None:
        raise ValueError("no mesh: pass mesh=, rules= an ActivationSharding, or call it under jax.set_mesh(mesh)")
    named = {a for _, axes in rules for a in axes_tuple(axes)}
    missing = sorted(named - set(mesh.axis_names))
    if missing:
        raise ValueError(f"attention's mesh axes {missing} are not axes of the mesh ({', '.join(mesh.axis_names)})")
    return SequenceAxes(mesh, tuple(rules), length_axis(rules, mesh))


def length_axis(rules: Rules, mesh: AnyMesh) -> str | None:
    """The one mesh axis the rules put ``length`` on, or None where they put it on none."""
    axes = rule_axes(rules, "length")
    if len(axes) > 1:
        raise ValueError(f"attention over a sequence runs over one mesh axis, but the rules map `length` to {axes}")
    if axes and axes[0] not in mesh.axis_names:
        raise ValueError(f"the rules map `length` to mesh axis {axes[0]!r}, which the mesh does not have")
    return axes[0] if axes else None


def _axes_or_none(axes: tuple[str, ...]) -> MeshAxes:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _context_or(mesh: AnyMesh | None) -> AnyMesh | None:
    """Inside a shard_map, the context's abstract mesh (it knows which axes are manual); else ``mesh``."""
    context = jax.sharding.get_abstract_mesh()
    return mesh if context.empty else context


def _manual_axes() -> frozenset[str]:
    context = jax.sharding.get_abstract_mesh()
    return frozenset() if context.empty else frozenset(context.manual_axes)


def dot_product_attention(
    query_BxLxHxK: jax.Array,
    key_BxMxNxK: jax.Array,
    value_BxMxNxK: jax.Array,
    bias: jax.Array | None = None,
    *,
    is_causal: bool = False,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "ring",
    mesh: AnyMesh | None = None,
    rules: Rules | ActivationSharding | None = None,
    seq_axis: str | None = None,
    batch_axes: str | tuple[str, ...] | None = None,
    heads_axis: str | None = None,
    layout: str = "none",
    block_k: int = DEFAULT_BLOCK_K,
    ulysses_degree: int | None = None,
    ulysses_kernel: str = "dense",
) -> jax.Array:
    """Multi-head (grouped-query) attention with its sequence split over a mesh axis; [B, L, H, K].

    Args:
      query_BxLxHxK, key_BxMxNxK, value_BxMxNxK: as for ``jax.nn.dot_product_attention``: B batch,
        L/M query/key length, H query heads, N kv heads (H % N == 0; head h uses kv head h // (H/N)),
        K head dim. In context (a) global arrays, sharded (or not) as the caller likes: the
        shard_map reshards them to batch over ``batch``, length over the sequence axis, heads
        over ``heads``/``kv_heads``. In context (b) this device's blocks.
      bias: added to the scaled scores, broadcastable to [B, H, L, M] (its last two dimensions
        whole: L and M). With ring/allgather it is split over its query dimension L like q
        (its key dimension M stays whole on every device: a ring step adds the [L/p, M/p] tile
        of the key block it attends to), and over batch and heads where it has them. In
        context (b): this device's [.., L/p, M] rows.
      is_causal: query i sees key j iff position(i) >= position(j): ``query_positions`` and
        ``key_positions`` (int [B, L], [B, M]; packed documents restart them) when given, else
        the index (for ``layout="zigzag"``: the original index of each stored token).
      query_segment_ids, key_segment_ids: int [B, L], [B, M]; a query sees only keys of its
        segment (packed documents). Give both or neither, and positions likewise.
      scale: multiplies q.k; default K ** -0.5.
      impl: ``ring``, ``allgather``, ``ulysses``, ``fused`` or ``dense`` (module doc). ``fused``
        needs the whole sequence on every device; ``ulysses`` needs this device's query heads
        (after the heads axis) to split over its degree.
      mesh, rules, seq_axis, batch_axes, heads_axis: where the dimensions live (module doc);
        ring and allgather need a sequence axis from one or the other.
      layout: the stored token order on the sequence axis (ring and allgather): ``none`` (the
        natural order, split contiguously) or ``zigzag`` (``ring_attention.token_order``: equal
        causal work per device; the caller stores the sequence that way).
      block_k: the ring's keys per inner block.
      ulysses_degree: ``ulysses``: the all-to-all group size u, dividing the sequence axis's p
        devices (default p); u < p runs the ring across the p / u groups (``layout`` then orders
        the ring's blocks: ``token_order(L, p // u, layout)``).
      ulysses_kernel: ``ulysses`` with u = p: the kernel on whole sequences, ``dense`` or ``fused``.
    Returns:
      [B, L, H, K] in the query's dtype, sharded like the query.
    Raises:
      ValueError: naming the argument that is off: shapes, dtypes, a length the sequence axis
        does not divide, ``fused`` on a split sequence, axes the mesh lacks.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown attention layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout != "none" and impl not in _SHARDED:
        raise ValueError(f"layout={layout!r} is the ring's and the all-gather's token order; impl={impl!r} has none")
    if ulysses_kernel not in ULYSSES_KERNELS:
        raise ValueError(f"unknown ulysses_kernel {ulysses_kernel!r}; expected one of {', '.join(ULYSSES_KERNELS)}")
    axes = resolve_axes(mesh, rules, seq_axis, batch_axes, heads_axis)
    degree = _ulysses_degree(impl, ulysses_degree, ulysses_kernel, layout, axes)
    local = axes.seq_axis is not None and axes.seq_axis in _manual_axes()
    bias = check_inputs(
        query_BxLxHxK, key_BxMxNxK, value_BxMxNxK, bias,
        query_positions, key_positions, query_segment_ids, key_segment_ids,
        bias_keys=key_BxMxNxK.shape[1] * (axes.size() if local else 1),
    )  # fmt: skip
    kernel = _Kernel(impl, is_causal, layout, scale, block_k, axes.seq_axis, axes.size(), degree, ulysses_kernel)
    given = {"q": query_BxLxHxK, "k": key_BxMxNxK, "v": value_BxMxNxK, "bias": bias}
    given |= {"q_pos": query_positions, "kv_pos": key_positions}
    given |= {"q_seg": query_segment_ids, "kv_seg": key_segment_ids}
    arrays = {name: x for name, x in given.items() if x is not None}
    if local:
        return kernel.local(arrays)  # (b): this device's blocks
    if impl in ("fused", "dense"):
        if axes.size() > 1 and impl == "fused":
            raise ValueError(
                f"impl='fused' (jax.nn.dot_product_attention) needs the whole sequence on every device, but the "
                f"sequence axis {axes.seq_axis!r} has {axes.size()} devices; use impl='ring' or 'allgather'"
            )
        return kernel.whole(arrays)
    if axes.seq_axis is None:
        raise ValueError(
            f"impl={impl!r} splits the sequence over a mesh axis: pass seq_axis= (and mesh=), or rules= "
            f"that map `length` to one"
        )
    if _manual_axes():
        raise ValueError(
            f"inside a shard_map manual over {sorted(_manual_axes())}, impl={impl!r} needs the sequence axis "
            f"{axes.seq_axis!r} manual too (then it runs on this device's blocks)"
        )
    _check_divides(impl, axes, query_BxLxHxK.shape[1], key_BxMxNxK.shape[1], degree)
    return _sharded(kernel, axes, arrays)


def check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.typing.ArrayLike | None,
    q_pos: jax.Array | None,
    kv_pos: jax.Array | None,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    bias_keys: int | None = None,
) -> jax.Array | None:
    """Raises ``ValueError`` naming the argument whose shape or dtype is off; returns the bias as 4-D.

    ``bias_keys``: the bias's key dimension (default M; p * M for this device's rows in context (b)).
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention wants query [B, L, H, K] and key, value [B, M, N, K]; got query {q.shape}, "
            f"key {k.shape}, value {v.shape}"
        )
    b, length, h, hd = q.shape
    kv_len, n = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != hd or h % n:
        raise ValueError(f"key/value {k.shape} do not fit query {q.shape} (same B and K, kv heads N dividing H)")
    for name, x, shape in (
        ("query_positions", q_pos, (b, length)),
        ("key_positions", kv_pos, (b, kv_len)),
        ("query_segment_ids", q_seg, (b, length)),
        ("key_segment_ids", kv_seg, (b, kv_len)),
    ):
        if x is not None and (tuple(x.shape) != shape or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(f"{name} must be integers of shape {shape} [B, length]; got {x.dtype} {tuple(x.shape)}")
    if (q_pos is None) != (kv_pos is None):
        raise ValueError("give query_positions and key_positions together, or neither")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("give query_segment_ids and key_segment_ids together, or neither")
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    full = (b, h, length, kv_len if bias_keys is None else bias_keys)
    padded = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    fits = len(padded) == 4 and all(s in (1, f) for s, f in zip(padded[:2], full[:2], strict=True))
    if not (fits and padded[2:] == full[2:]):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not broadcast to [B, H, L, M] = {full} with L and M whole "
            f"(its first dimensions B or 1, H or 1)"
        )
    return bias.reshape(padded)


def _ulysses_degree(impl: str, degree: int | None, kernel: str, layout: str, axes: SequenceAxes) -> int | None:
    """The Ulysses degree (the sequence axis's size by default), checked; None for other impls."""
    if impl != "ulysses":
        if degree is not None or kernel != "dense":
            raise ValueError(
                f"ulysses_degree and ulysses_kernel are impl='ulysses' settings; impl={impl!r} takes neither"
            )
        return None
    p = axes.size()
    degree = p if degree is None else int(degree)
    groups_of(p, degree)  # raises unless the degree divides the axis
    if degree < p and kernel != "dense":
        raise ValueError(
            f"ulysses_kernel={kernel!r} with ulysses_degree={degree} < {axes.seq_axis}={p}: the hybrid runs the "
            f"ring across the Ulysses groups, its own kernel; use ulysses_degree={p} for the {kernel} kernel"
        )
    if degree == p and layout != "none":
        raise ValueError(
            f"layout={layout!r} orders the ring's blocks; Ulysses over all {p} devices attends whole sequences "
            f"(layout='none')"
        )
    return degree


def _check_divides(impl: str, axes: SequenceAxes, length: int, kv_len: int, degree: int | None = None) -> None:
    p = axes.size()
    ring = p // degree if impl == "ulysses" and degree is not None else p
    has_ring = impl == "ring" or ring < p
    parts = math.lcm(p, 2 * ring) if has_ring else p
    for name, n in (("query length L", length), ("key length M", kv_len)):
        if n % parts:
            each = " (two equal chunks per device of the ring)" if has_ring else ""
            raise ValueError(
                f"impl={impl!r} splits the {name}={n} over {axes.seq_axis}={p} devices{each}: "
                f"it must be divisible by {parts}"
            )


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """The chosen kernel with its settings, on local blocks (``local``) or whole arrays (``whole``)."""

    impl: str
    is_causal: bool
    layout: str
    scale: float | None
    block_k: int
    seq_axis: str | None
    seq_size: int
    ulysses_degree: int | None = None
    ulysses_kernel: str = "dense"

    def _masks(self, a: dict[str, jax.Array]) -> dict[str, Any]:
        return {
            "query_positions": a.get("q_pos"),
            "key_positions": a.get("kv_pos"),
            "query_segment_ids": a.get("q_seg"),
            "key_segment_ids": a.get("kv_seg"),
            "scale": self.scale,
            "is_causal": self.is_causal,
        }

    def local(self, a: dict[str, jax.Array]) -> jax.Array:
        """On this device's blocks, the sequence axis manual (context (b), or inside ``_sharded``)."""
        context = _context_or(None)
        assert context is not None, "local() runs inside a shard_map (its context mesh)"
        p = int(context.shape[self.seq_axis])
        on_ring = {"axis_name": self.seq_axis, "axis_size": p, "layout": self.layout, **self._masks(a)}
        if self.impl == "ring":
            return ring_attention(a["q"], a["k"], a["v"], a.get("bias"), block_k=self.block_k, **on_ring)
        if self.impl == "ulysses":
            degree = self.ulysses_degree or p
            attend = self._ulysses_attend() if degree == p else None
            return ulysses_attention(
                a["q"], a["k"], a["v"], a.get("bias"), block_k=self.block_k, degree=degree, attend=attend, **on_ring
            )
        if self.impl == "allgather" or (self.impl == "dense" and p > 1):
            # Inside the caller's shard_map (a partial-manual region) the gather's transpose runs in float32.
            in_own_region = _manual_axes() == frozenset(context.axis_names)
            return allgather_attention(
                a["q"], a["k"], a["v"], a.get("bias"), float32_gradients=not in_own_region, **on_ring
            )
        if self.impl == "fused" and p > 1:
            raise ValueError(
                f"impl='fused' (jax.nn.dot_product_attention) needs the whole sequence on every device; "
                f"here the sequence axis {self.seq_axis!r} splits it over {p}; use impl='ring' or 'allgather'"
            )
        return self.whole(a)

    def _ulysses_attend(self) -> Attend:
        """The Ulysses kernel on whole sequences, called like ``gqa_attention`` (its masks by keyword)."""
        inner = dataclasses.replace(self, impl=self.ulysses_kernel, seq_axis=None, seq_size=1)
        names = {"query_positions": "q_pos", "key_positions": "kv_pos"}
        names |= {"query_segment_ids": "q_seg", "key_segment_ids": "kv_seg"}

        def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, **masks: Any) -> jax.Array:
            given = {"q": q, "k": k, "v": v, "bias": bias} | {names[n]: x for n, x in masks.items() if n in names}
            return inner.whole({name: x for name, x in given.items() if x is not None})

        return attend

    def whole(self, a: dict[str, jax.Array]) -> jax.Array:
        """On whole sequences: the reference math (dense) or ``jax.nn.dot_product_attention`` (fused)."""
        if self.impl == "dense":
            return gqa_attention(a["q"], a["k"], a["v"], a.get("bias"), **self._masks(a))
        positions = (a.get("q_pos"), a.get("kv_pos")) if self.is_causal and "q_pos" in a else (None, None)
        mask = visible_mask(positions[0] is not None, *positions, a.get("q_seg"), a.get("kv_seg"))
        by_index = self.is_causal and positions[0] is None
        return jax.nn.dot_product_attention(
            a["q"],
            a["k"],
            a["v"],
            a.get("bias"),
            None if mask is None else mask[:, None],
            scale=self.scale,
            is_causal=by_index,
        )


_LOGICAL = {
    "q": ("batch", "length", "heads", None),
    "k": ("batch", "length", "kv_heads", None),
    "v": ("batch", "length", "kv_heads", None),
    "q_pos": ("batch", "length"),
    "kv_pos": ("batch", "length"),
    "q_seg": ("batch", "length"),
    "kv_seg": ("batch", "length"),
}


def _bias_axes(bias: jax.Array, q: jax.Array) -> LogicalAxes:
    """The bias's logical axes: batch and heads where it has them, queries split like q's, keys whole."""
    batch = "batch" if bias.shape[0] == q.shape[0] else None
    return (batch, "heads" if bias.shape[1] == q.shape[2] else None, "length", None)


def _sharded(kernel: _Kernel, axes: SequenceAxes, arrays: dict[str, jax.Array]) -> jax.Array:
    """Context (a): the kernel in a shard_map manual over every mesh axis, specs from the rules."""
    logical = dict(_LOGICAL)
    if "bias" in arrays:
        logical["bias"] = _bias_axes(arrays["bias"], arrays["q"])
    specs = {name: axes.spec(x.shape, logical[name], what=f"attention {name}") for name, x in arrays.items()}
    mesh = axes.mesh
    assert mesh is not None, "a sequence axis comes with a mesh (resolve_axes)"
    if AxisType.Explicit in tuple(mesh.axis_types):  # explicit shardings are not resharded implicitly
        arrays = {name: jax.sharding.reshard(x, NamedSharding(mesh, specs[name])) for name, x in arrays.items()}
    run = jax.shard_map(kernel.local, mesh=mesh, in_specs=(specs,), out_specs=specs["q"], check_vma=False)
    y_BxLxHxK: jax.Array = run(arrays)
    return y_BxLxHxK
