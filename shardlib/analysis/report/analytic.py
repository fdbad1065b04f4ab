"""The analytic communication model: bytes each device must move per step, per strategy and mesh axis.

With N devices on an axis, P the parameter bytes a device's group shares,
m = grad_accum microbatches, b x s the tokens of one microbatch on one device
(b sequences, s = seq_len / seq positions) and c the compute dtype's bytes:

* data parallel (parameters replicated over the token axes): one gradient
  all-reduce per step, 2(N-1)/N * P: with ``grad_accum`` > 1 the step sums
  each device's partial gradients over the microbatches and reduces once
  (``shardlib.parallel.reduction.reduce_deferred``). The weights it does not
  reduce per use (a mixture of experts' router and experts, DiLoCo's inner
  steps) are the partitioner's: one all-reduce per microbatch;
* FSDP (parameters sharded over ``data``): all-gather in the forward pass,
  again in the backward pass, reduce-scatter of the gradients:
  3(N-1)/N * P per microbatch for the scanned layers. Parameters outside the
  layer scan (output projection, final norm) are gathered once when they are
  used in their own dtype: the backward pass reuses the forward's copy (XLA
  merges the two identical gathers). The embedding lookup gathers its table
  when it has no more rows than a device has tokens
  (``reduction.lookup_gathers_table``), and otherwise gathers the token ids
  and all-to-alls the looked-up rows, both ways;
* HSDP (``data_replica`` > 1): parameters are never split over ``data_replica``,
  so the FSDP terms above stay over ``data`` and each gradient shard is
  all-reduced over ``data_replica``: 2(R-1)/R of the bytes a device holds,
  once per step like data parallelism's all-reduce;
* tensor parallel (Megatron, heads and MLP over ``model``): per layer two
  all-reduces of the b*s*D activations forward and two backward (one more
  backward with ``remat: full``, which recomputes the attention half), plus
  the vocabulary-parallel embedding (one forward), the output projection (one
  backward) and the loss's max/sum over the vocabulary (small);
* sequence (``length`` over ``seq``): K and V gathered per layer,
  (p-1)/p of them forward and twice that backward (re-gather plus the
  reduce-scatter of their gradients). XLA (dense attention) and
  ``attention.impl: allgather`` gather (allgather keeps the forward's copy
  for the backward pass unless remat recomputes it); ring attention moves
  the gathers' bytes in p-1 permutes, overlapped with compute, and the
  gradients in p (one more hop home);
* pipeline (``layers`` over ``pipe``): b*s*D per microbatch and boundary
  between virtual stages each way (a mean over the stages), and the gradients
  of the parameters outside the stages (embedding, head) summed over ``pipe``;
* experts (MoE, ``shardlib.parallel.experts``): per MoE layer and microbatch, two
  all-to-alls (dispatch, combine) of the capacity-padded [E, b, C, D] buffer
  forward, two backward, two more when remat recomputes the forward pass; the
  experts' gradients are not reduced over the expert axes (each device owns
  its experts). Without MoE layers the ``expert`` axis only splits the batch;
* DiLoCo and local SGD (``outer``, ``shardlib.parallel.diloco``): the inner steps
  reduce nothing over the replica axes (the terms above lose those axes), and
  every H steps one all-reduce of the pseudo-gradient, 2(R-1)/R of the
  parameter bytes a device holds (compressed: of its payload), is shown
  averaged over the H steps it serves.

Bytes are "wire" bytes (see ``collectives.wire_bytes``); multi-axis groups are
attributed to axes with ``collectives.split_by_axis``, as measured ones are.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from shardlib.analysis.report.collectives import split_by_axis, wire_bytes
from shardlib.analysis.report.layout import Layout, ParamLayout
from shardlib.analysis.report.stage_passes import pipelined_layer_passes
from shardlib.core.rules import axes_tuple, logical_to_spec, preset_rules
from shardlib.parallel.pipeline.schedules import cross_device_boundaries, placement
from shardlib.parallel.reduction import lookup_gathers_table


@dataclasses.dataclass(frozen=True)
class Term:
    """One kind of traffic the model predicts."""

    strategy: str  # "data parallel", "fsdp", "tensor parallel", "sequence", "pipeline", "experts"
    what: str
    kind: str
    axes: tuple[str, ...]
    group: int  # devices per group
    message_bytes: float  # per op and device
    count: int  # ops per step
    wire_bytes: float  # per device per step
    overlappable: bool  # can hide behind compute (gradient sync, FSDP gathers) or sits on the critical path
    note: str = ""

    def per_axis(self, sizes) -> dict[str, float]:
        shares = split_by_axis(self.kind, self.message_bytes, self.axes, sizes)
        total = sum(shares.values())
        return {a: v * self.wire_bytes / total for a, v in shares.items()} if total else {}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"axes": list(self.axes)}


def _term(strategy, what, kind, axes, sizes, message, count, overlappable, **kw) -> Term | None:
    group = int(np.prod([sizes[a] for a in axes])) if axes else 1
    if group < 2 or count == 0 or message <= 0:
        return None
    wire = wire_bytes(kind, message, group) * count
    return Term(strategy, what, kind, tuple(axes), group, float(message), int(count), wire, overlappable, **kw)


def _is_lookup_table(p: ParamLayout) -> bool:
    return p.logical_axes == ("vocab", "embed")


def gradient_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """Data parallel and FSDP: gradient reduction over the token axes, and FSDP's parameter gathers.

    Per microbatch: one op per layer for the scanned parameters (XLA combines
    a layer's collectives) and one for the rest; the message is the sum of the
    parameters it carries. With ``grad_accum`` > 1, a parameter outside the
    layer scan is gathered once per step (the gather does not depend on the
    microbatch: XLA hoists it out of the accumulation loop), and the
    all-reduce of a gradient the step reduces per use waits for the last
    microbatch: one per step (``_reduced_per_use``). FSDP inside a pipeline
    gathers each parameter once per step and reduce-scatters its gradient once
    (``shardlib.parallel.pipeline.executor``): 2(N-1)/N of it, no backward
    gather, and the embedding gathered like any parameter.
    """
    sizes, m = layout.sizes, layout.microbatches
    group = layout.token_axes
    if not group:
        return []
    per_use = _reduced_per_use(layout)
    # (strategy, what, kind, axes, ops per step, overlappable) -> bytes per op
    messages: dict[tuple, float] = defaultdict(float)
    pipelined = sizes["pipe"] > 1
    # A pipeline's executor gathers before its tick loop and reduces after it: no compute to hide behind.
    hides = not pipelined
    out: list[Term | None] = []
    for p in layout.params:
        # Experts split over a token axis are owned, not gathered: their gradients come whole
        # from the tokens the all-to-all brought, so neither FSDP nor a reduction over that axis.
        fsdp = tuple(a for a in group if a in p.mesh_axes and a not in p.expert_axes)
        rest = tuple(a for a in group if a not in p.mesh_axes)
        # Scanned parameters: one op per layer this device runs (its stages' share with a pipeline).
        layers = p.shape[0] // (sizes["pipe"] if "pipe" in p.mesh_axes else 1) if p.scanned else 1
        local = p.bytes_per_device / layers  # what this device stores, per layer
        scope = "layer" if p.scanned else "other"
        # The all-reduce over the axes the parameter is not split over: once per step when the step
        # reduces it per use (a stacked parameter in one op), else per layer and microbatch.
        # What the reductions carry: model.reduce_dtype for the step's own (per use, a pipeline's).
        reduced = local * _reduce_itemsize(layout, p, per_use, platform) / p.itemsize
        ops, message = (1, reduced * layers) if m > 1 and p.path in per_use else (layers * m, reduced)
        all_reduce = "gradient all-reduce" + (" of the shard" if fsdp else "")
        if rest:
            messages[("data parallel", f"{all_reduce} ({scope})", "all-reduce", rest, ops, hides)] += message
        if not fsdp:
            continue
        gathered = local * int(np.prod([sizes[a] for a in fsdp]))
        if pipelined:  # the executor gathers every parameter once per step and reduce-scatters once after it
            what = "gather parameters once per step (pipeline)"
            messages[("fsdp", f"{what}, {scope}", "all-gather", fsdp, layers, hides)] += gathered
            what = "reduce-scatter gradients (pipeline)"
            messages[("fsdp", f"{what}, {scope}", "reduce-scatter", fsdp, layers, hides)] += gathered * reduced / local
        elif _is_lookup_table(p) and not layout.cfg.model.tie_embeddings and not _gathers_table(layout, p):
            out += _lookup_terms(layout, p, fsdp)
        else:
            gathers = [("gather parameters (forward)", "all-gather"), ("gather parameters (backward)", "all-gather")]
            same_dtype = layout.cfg.model.compute_dtype == layout.cfg.model.param_dtype
            lookup_only = _is_lookup_table(p) and not layout.cfg.model.tie_embeddings
            if not p.scanned and (same_dtype or lookup_only or m > 1):
                # Outside the layer scan the backward pass's gather is the forward's
                # own (same operand, same program level, or both hoisted out of the
                # accumulation loop): XLA keeps one copy. A lookup's backward needs no
                # table at all (token ids have no gradient).
                gathers = [("gather parameters (forward, kept for backward)", "all-gather")]
            gather_ops = layers * m if p.scanned else 1
            for what, kind in gathers:
                messages[("fsdp", f"{what}, {scope}", kind, fsdp, gather_ops, hides)] += gathered
            messages[("fsdp", f"reduce-scatter gradients, {scope}", "reduce-scatter", fsdp, layers * m, hides)] += (
                gathered * reduced / local
            )
    for (strategy, what, kind, axes, ops, overlap), message in messages.items():
        out.append(_term(strategy, what, kind, axes, sizes, message, ops, overlap))
    return [t for t in out if t is not None]


def _reduce_itemsize(layout: Layout, p: ParamLayout, per_use: set[str], platform: str | None) -> int:
    """Bytes per value of ``p``'s gradient reductions: ``model.reduce_dtype`` (as ``platform`` carries it)
    where the step makes them (per use, and in a pipeline's executor), the parameter's own dtype where
    the partitioner does."""
    from shardlib.training.parallel_plan import reduction_dtype

    if not (p.path in per_use or layout.sizes["pipe"] > 1):
        return p.itemsize
    dtype, _ = reduction_dtype(getattr(layout.cfg.model, "reduce_dtype", None), layout.cfg.model.param_dtype, platform)
    return np.dtype(dtype).itemsize


def _reduced_per_use(layout: Layout) -> set[str]:
    """The parameter paths whose gradients the step reduces per use (``training.step.weight_use``):
    every weight the model applies through ``WEIGHT_PARAMS``, outside a pipeline and DiLoCo."""
    from shardlib.models.transformer import WEIGHT_PARAMS

    outer = getattr(layout.cfg, "outer", None)
    if layout.sizes["pipe"] > 1 or (outer is not None and outer.algorithm != "none"):
        return set()
    return {"/".join(path) for path in WEIGHT_PARAMS.values()}


def _gathers_table(layout: Layout, table: ParamLayout) -> bool:
    """Whether the step gathers the FSDP-sharded embedding table for its lookup (the step's own rule)."""
    return lookup_gathers_table(table.shape[0], layout.tokens_per_device)


def _lookup_terms(layout: Layout, table: ParamLayout, fsdp: tuple[str, ...]) -> list[Term | None]:
    """Embedding lookup with the table's ``embed`` dimension sharded: ids gathered, rows all-to-all'd."""
    sizes, m = layout.sizes, layout.microbatches
    f = int(np.prod([sizes[a] for a in fsdp]))
    tokens = layout.tokens_per_device * f  # the ids of the whole FSDP group
    rows = tokens * layout.cfg.model.d_model // f * table.itemsize  # all tokens, 1/f of each row
    return [
        _term("fsdp", "embedding lookup: gather token ids", "all-gather", fsdp, sizes, tokens * 4, m, True),
        _term("fsdp", "embedding lookup: rows to their tokens", "all-to-all", fsdp, sizes, rows, m, False),
        _term("fsdp", "embedding lookup: row gradients back", "all-to-all", fsdp, sizes, rows, m, True),
    ]


def tensor_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """Megatron tensor parallelism over ``model`` (heads and MLP sharded).

    Inside pipeline stages the layers' all-reduces follow the executor's forwards (recomputed
    ones included) and backwards on ``platform``'s branching (``stage_passes``)."""
    sizes, cfg = layout.sizes, layout.cfg
    axes = ("model",) if layout.heads_shards > 1 or layout.mlp_shards > 1 else ()
    if not axes:
        return []
    m, layers = layout.forward_passes, layout.layers_per_device
    c = np.dtype(cfg.model.compute_dtype).itemsize
    p = np.dtype(cfg.model.param_dtype).itemsize
    tokens = layout.tokens_per_device
    act = tokens * cfg.model.d_model * c
    # One all-reduce for attention and one for the MLP per layer each way; a MoE
    # layer's MLP sums its expert buffer instead (``expert_terms``).
    dense_mlps = layers - getattr(cfg.model, "n_moe_layers", 0)
    if sizes["pipe"] > 1:
        passes, per_layer = pipelined_layer_passes(layout, platform), (layers + dense_mlps) / layers
        forwards, backwards = passes.forward * per_layer, passes.backward * per_layer
    else:
        forwards = (layers + dense_mlps) * m
        backwards = (layers + dense_mlps + (layers if cfg.model.remat == "full" else 0)) * m
    out = [
        _term("tensor parallel", "layer activations (forward)", "all-reduce", axes, sizes, act, forwards, False),
        _term("tensor parallel", "layer activations (backward)", "all-reduce", axes, sizes, act, backwards, False),
    ]
    if layout.vocab_shards > 1:
        out += [
            _term(
                "tensor parallel",
                "vocab-parallel embedding (forward)",
                "all-reduce",
                axes,
                sizes,
                tokens * cfg.model.d_model * p,
                m,
                False,
            ),
            _term("tensor parallel", "output projection input gradient", "all-reduce", axes, sizes, act, m, False),
            _term(
                "tensor parallel",
                "loss max/sum over the vocabulary",
                "all-reduce",
                axes,
                sizes,
                tokens * 4,
                3 * m,
                False,
            ),
        ]
    return [t for t in out if t is not None]


def sequence_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """K and V over the ``seq`` axis: gathered (dense, allgather) or passed round the ring, the same bytes.

    In a pipeline they run inside the stages: counted by the executor's actions
    (``stage_passes``, on ``platform``'s branching), dense attention there is
    the all-gather kernel, and that kernel's gradients are reduce-scattered in
    float32 (``shardlib.parallel.attention._gather_kernel``).
    """
    if layout.seq_shards < 2:
        return []
    cfg, sizes = layout.cfg, layout.sizes
    c = np.dtype(cfg.model.compute_dtype).itemsize
    kv_heads = cfg.model.n_kv_heads // layout.kv_shards
    # K and V (2 of them) of the whole sequence, as each device needs them for its queries.
    kv = 2 * layout.rows_per_device * cfg.seq_len * kv_heads * cfg.model.resolved_head_dim * c
    ring = cfg.attention.impl == "ring"
    grad_bytes = kv
    if sizes["pipe"] > 1:
        passes = pipelined_layer_passes(layout, platform)
        forwards, again, backwards = passes.forward, passes.backward if ring else 0, passes.backward
        if not ring:
            grad_bytes = kv * 4 / c
    else:
        n = layout.layers_per_device * layout.forward_passes
        # Without remat the allgather kernel's gathered K and V are residuals of its own backward pass;
        # XLA's dense attention and the ring gather (rotate) them again, and any remat recomputes them.
        kept = cfg.attention.impl == "allgather" and cfg.model.remat == "none"
        forwards, again, backwards = n * (2 if cfg.model.remat == "full" else 1), 0 if kept else n, n
    p = layout.seq_shards
    ring_hops = p / (p - 1) if ring else 1.0
    note = "ring attention: seq-1 permutes instead of each gather, seq permutes for the gradients"
    out = [
        _term("sequence", "K and V (forward)", "all-gather", ("seq",), sizes, kv, forwards, False, note=note),
        _term("sequence", "K and V again (backward)", "all-gather", ("seq",), sizes, kv, again, False, note=note),
        # The ring carries each block's gradient p hops, back to its owner: p/(p-1) of a reduce-scatter.
        _term(
            "sequence",
            "K and V gradients",
            "reduce-scatter",
            ("seq",),
            sizes,
            grad_bytes * ring_hops,
            backwards,
            False,
            note=note,
        ),
    ]
    return [t for t in out if t is not None]


def pipeline_terms(layout: Layout) -> list[Term]:
    """Activations across stage boundaries, b*s*D per microbatch each way; the outer parameters' gradients.

    Every microbatch crosses each of the p*v - 1 boundaries between virtual
    stages once forward (its activations) and once backward (their gradient):
    m (p v - 1) messages each way over the p stages, a mean of m (p v - 1) / p
    per device (the first stage sends nothing back, the last nothing on). A V
    (zb-v) turns on one device, so one boundary of its 2p - 1 sends nothing.
    The executor's permutes connect only the pairs the table has an arrival
    for, so this is what it sends.
    """
    if layout.sizes["pipe"] < 2:
        return []
    cfg, sizes = layout.cfg, layout.sizes
    act = layout.tokens_per_device * cfg.model.d_model * np.dtype(cfg.model.compute_dtype).itemsize
    p, v = sizes["pipe"], cfg.pipeline.virtual_stages
    crossings = cross_device_boundaries(placement(cfg.pipeline.schedule), p, v)
    sends = layout.forward_passes * crossings  # over all stages, each way
    out = [
        Term(
            "pipeline",
            what,
            "collective-permute",
            ("pipe",),
            p,
            float(act),
            sends,
            act * sends / p,
            False,
            note="mean over the stages",
        )
        for what in ("activations to the next stage", "gradients to the previous stage")
    ]
    # Embedding, head and final norm live on every stage but get gradients on one: summed over pipe.
    outer = sum(param.bytes_per_device for param in layout.params if not param.scanned)
    what = "gradients of the parameters outside the stages"
    out.append(_term("pipeline", what, "all-reduce", ("pipe",), sizes, outer, layout.microbatches, True))
    return [t for t in out if t is not None]


def expert_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """MoE dispatch/combine all-to-alls of the [E, b, C, D] buffer: 2 forward + 2 backward per MoE layer.

    C = ceil(capacity_factor * s * k / E) slots per expert and sequence (s the
    tokens of a sequence on the device); the buffer is in the compute dtype.
    Remat (``full`` or ``save_matmuls``: the experts' einsums are batched over
    experts, so not saved) recomputes the forward pass and its two all-to-alls.
    """
    from shardlib.models.moe import capacity

    cfg, sizes = layout.cfg, layout.sizes
    moe = getattr(cfg.model, "moe", None)
    axes = next((p.expert_axes for p in layout.params if p.expert_axes), ())
    if moe is None or not moe.n_experts or not axes:
        return []
    c = np.dtype(cfg.model.compute_dtype).itemsize
    cap = capacity(cfg.seq_len // layout.seq_shards, moe.n_experts, moe.top_k, moe.capacity_factor)
    buffer = moe.n_experts * layout.rows_per_device * cap * cfg.model.d_model * c
    n = cfg.model.n_moe_layers * layout.forward_passes
    forwards, backwards = n * (1 if cfg.model.remat == "none" else 2), n
    if sizes["pipe"] > 1:  # inside the stages: the executor's forwards and backwards (``stage_passes``)
        passes = pipelined_layer_passes(layout, platform)
        share = cfg.model.n_moe_layers / cfg.model.n_layers
        forwards, backwards = round(passes.forward * share), round(passes.backward * share)
    out = [
        _term(
            "experts",
            "tokens to their experts and back (forward)",
            "all-to-all",
            axes,
            sizes,
            buffer,
            2 * forwards,
            False,
        ),
        _term("experts", "their gradients (backward)", "all-to-all", axes, sizes, buffer, 2 * backwards, False),
    ]
    # Tensor parallelism inside the experts: the hidden dim over the `mlp` axes, one
    # all-reduce of the received buffer forward (again under remat) and one backward.
    f = cfg.model.moe.expert_d_ff or cfg.model.d_ff
    mlp = logical_to_spec(("mlp",), preset_rules(layout.sharding), sizes, shape=(f,))[0]
    tensor = axes_tuple(mlp)
    if tensor and not set(tensor) & set(layout.batch_axes):
        what = "expert outputs summed over hidden-dim shards"
        out += [
            _term("tensor parallel", f"{what} (forward)", "all-reduce", tensor, sizes, buffer, forwards, False),
            _term("tensor parallel", f"{what}: input gradients", "all-reduce", tensor, sizes, buffer, backwards, False),
        ]
    return [t for t in out if t is not None]


def _moment_terms(outer, replica: tuple[str, ...], group: int, values: int) -> list[Term]:
    """``outer.average_moments``: one float32 all-reduce of the parameters' size per averaged moment
    (AdamW's mu, and nu), once per outer step, averaged per step."""
    count = {"none": 0, "first": 1, "both": 2}[getattr(outer, "average_moments", "none")]
    if not count:
        return []
    message = 4.0 * values
    per_period = count * wire_bytes("all-reduce", message, group)
    what = f"inner AdamW moments all-reduce ({outer.average_moments}), once per {outer.inner_steps} steps, per step"
    note = f"{per_period:,.0f} bytes per outer step, float32, uncompressed"
    return [
        Term("diloco", what, "all-reduce", replica, group, message, count, per_period / outer.inner_steps, False, note)
    ]


def diloco_terms(layout: Layout, terms: list[Term]) -> list[Term]:
    """``terms`` as DiLoCo's inner steps move them (no gradient traffic over the replica axes), plus
    the outer all-reduce averaged over its period; ``terms`` unchanged without ``outer``."""
    from shardlib.parallel.compression import CONFIG_MODES, payload_bytes

    outer = getattr(layout.cfg, "outer", None)
    if outer is None or outer.algorithm == "none":
        return terms
    sizes = layout.sizes
    replica = tuple(a for a in outer.replica_axes if sizes[a] > 1)
    out: list[Term | None] = []
    for t in terms:
        if t.strategy in ("data parallel", "fsdp") and set(t.axes) & set(replica):
            axes = tuple(a for a in t.axes if a not in replica)
            t = _term(t.strategy, t.what, t.kind, axes, sizes, t.message_bytes, t.count, t.overlappable, note=t.note)
        out.append(t)
    group = int(np.prod([sizes[a] for a in replica]))
    if group > 1:
        local = sum(p.bytes_per_device for p in layout.params)
        mode = CONFIG_MODES.get(outer.compression, "float32")
        values = int(sum(p.bytes_per_device / p.itemsize for p in layout.params))
        message = float(local if mode == "float32" else payload_bytes(values, mode))
        per_period = wire_bytes("all-reduce", message, group)
        what = (
            f"pseudo-gradient all-reduce ({outer.compression}), once per {outer.inner_steps} steps, averaged per step"
        )
        note = f"{per_period:,.0f} bytes per outer step, which the next period waits for (synchronous DiLoCo)"
        fragments = getattr(outer, "fragments", 1)
        if fragments > 1:
            what = (
                f"pseudo-gradient all-reduce ({outer.compression}), {fragments} fragments (streaming), each once per "
                f"{outer.inner_steps} steps, averaged per step"
            )
            note = (
                f"about {per_period / fragments:,.0f} bytes per outer step, one fragment every "
                f"{outer.inner_steps // fragments} steps ({per_period:,.0f} per period in all)"
            )
        overlapped = bool(getattr(outer, "overlap_steps", 0))
        if overlapped:
            note += "; it runs beside the next inner step (outer.overlap_steps: 1)"
            note = note.replace(", which the next period waits for (synchronous DiLoCo)", "")
        period = per_period / outer.inner_steps
        out.append(Term("diloco", what, "all-reduce", replica, group, message, 1, period, overlapped, note))
        out += _moment_terms(outer, replica, group, values)
    return [t for t in out if t is not None]


def predict_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """Every predicted term for ``layout``, in strategy order (DiLoCo's last).

    ``platform``: where the step compiles ("cpu" for a measured step on emulated
    devices), which decides a pipeline's branching and so how often the stages'
    collectives run (``stage_passes``); None predicts the table's own actions.
    """
    terms = [
        *gradient_terms(layout, platform),
        *tensor_terms(layout, platform),
        *sequence_terms(layout, platform),
        *pipeline_terms(layout),
        *expert_terms(layout, platform),
    ]
    return diloco_terms(layout, terms)


def per_axis(terms: list[Term], sizes) -> dict[str, float]:
    """Predicted wire bytes per step per mesh axis."""
    out: dict[str, float] = defaultdict(float)
    for term in terms:
        for axis, value in term.per_axis(sizes).items():
            out[axis] += value
    return dict(out)
