"""Activation traffic of the analytic model: tensor parallel, sequence, pipeline and expert terms.

Contract: ``tensor_terms``, ``sequence_terms``, ``expert_terms`` (each
``(layout, platform)``) and ``pipeline_terms(layout)`` return the terms of
the collectives that move activations (and their gradients) along the axes
that split a layer or the layer stack; inside a pipeline's stages they count
the executor's passes (``stage_passes``). Formulas: ``analytic``'s docstring.
"""

from __future__ import annotations

import math

import numpy as np

from shardlib.analysis.report.collectives import wire_bytes
from shardlib.analysis.report.layout import Layout
from shardlib.analysis.report.stage_passes import pipelined_layer_passes
from shardlib.analysis.report.terms import Term, _term
from shardlib.core.rules import axes_tuple, logical_to_spec, preset_rules
from shardlib.parallel.pipeline.schedules import cross_device_boundaries, placement


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
    if layout.cfg.attention.impl == "ulysses":
        return ulysses_terms(layout, platform)
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


def _layer_passes(layout: Layout, platform: str | None) -> tuple[int, int]:
    """(forwards, backwards) of every attention layer per step: the executor's in a pipeline, else
    one of each per layer and microbatch, and one more forward under ``remat: full``."""
    if layout.sizes["pipe"] > 1:
        passes = pipelined_layer_passes(layout, platform)
        return passes.forward, passes.backward
    n = layout.layers_per_device * layout.forward_passes
    return n * (2 if layout.cfg.model.remat == "full" else 1), n


def _grouped(strategy, what, kind, group, message, count, note="") -> Term | None:
    """A term over ``seq`` in groups of ``group`` of its devices (the Ulysses groups, the hybrid's rings)."""
    if group < 2 or count == 0 or message <= 0:
        return None
    wire = wire_bytes(kind, message, group) * count
    return Term(strategy, what, kind, ("seq",), group, float(message), int(count), wire, False, note=note)


def ulysses_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """``attention.impl: ulysses`` (``shardlib.parallel.ulysses_attention``): 4 all-to-alls per layer forward.

    q, k and v go in, the output comes back; each an all-to-all over a group of u devices (the
    degree) of a [b, s, h, K] block (s = seq_len / seq, h the device's heads; k and v with their
    kv heads repeated to a multiple of u), which sends (u-1)/u of it. The backward's mirror: the
    output's gradient in, dq, dk, dv back. The hybrid (u < seq) adds the ring across the seq/u
    groups, at the group's sequence block (s u) and heads / u: its K and V forward (again in the
    backward) and their gradients, as ``sequence_terms`` counts the ring.
    """
    cfg = layout.cfg
    m = cfg.model
    c = np.dtype(m.compute_dtype).itemsize
    p = layout.seq_shards
    u = cfg.attention.ulysses_degree or p
    heads, kv_heads = m.n_heads // layout.heads_shards, m.n_kv_heads // layout.kv_shards
    kv_heads *= u // math.gcd(kv_heads, u)  # repeated until they split over u
    block = layout.rows_per_device * (cfg.seq_len // p) * m.resolved_head_dim * c  # one head's [b, s, K]
    forwards, backwards = _layer_passes(layout, platform)
    note = f"all-to-alls within groups of {u} of seq's {p} devices" if u < p else ""
    out = [
        _grouped("sequence", "Ulysses q and output (forward)", "all-to-all", u, block * heads, 2 * forwards, note),
        _grouped("sequence", "Ulysses K and V (forward)", "all-to-all", u, block * kv_heads, 2 * forwards, note),
        _grouped("sequence", "Ulysses output and q gradients", "all-to-all", u, block * heads, 2 * backwards, note),
        _grouped("sequence", "Ulysses K and V gradients", "all-to-all", u, block * kv_heads, 2 * backwards, note),
    ]
    ring = p // u
    if ring > 1:
        kv = 2 * block * ring * u * (kv_heads // u)  # K and V of the whole sequence, the device's heads
        hops = ring / (ring - 1)
        why = f"the hybrid's ring across {ring} Ulysses groups: ring-1 permutes per pass, ring for the gradients"
        out += [
            _grouped("sequence", "hybrid ring: K and V (forward)", "all-gather", ring, kv, forwards, why),
            _grouped("sequence", "hybrid ring: K and V again (backward)", "all-gather", ring, kv, backwards, why),
            _grouped("sequence", "hybrid ring: K and V gradients", "reduce-scatter", ring, kv * hops, backwards, why),
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
    n = cfg.model.n_moe_layers * layout.forward_passes
    forwards, backwards = n * (1 if cfg.model.remat == "none" else 2), n
    if sizes["pipe"] > 1:  # inside the stages: the executor's forwards and backwards (``stage_passes``)
        passes = pipelined_layer_passes(layout, platform)
        share = cfg.model.n_moe_layers / cfg.model.n_layers
        forwards, backwards = round(passes.forward * share), round(passes.backward * share)
    if getattr(moe, "dispatch", "capacity") == "dropless":
        return dropless_terms(layout, platform, axes, forwards, backwards)
    cap = capacity(cfg.seq_len // layout.seq_shards, moe.n_experts, moe.top_k, moe.capacity_factor)
    buffer = moe.n_experts * layout.rows_per_device * cap * cfg.model.d_model * c
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


def dropless_terms(
    layout: Layout, platform: str | None, axes: tuple[str, ...], forwards: int, backwards: int
) -> list[Term]:
    """``model.moe.dispatch: dropless`` over the expert ``axes`` (``shardlib.parallel.dropless_experts``).

    The transport is the one the step would choose on ``platform`` (None: a GPU's) or the forced one.
    ``ragged_all_to_all``: two per MoE layer forward and two backward, each carrying the copies that
    leave a device, (X-1)/X of its T*k rows under balanced routing (counted as an all-to-all of T*k
    rows). ``all_gather``: forward, the tokens (compute dtype) and their routes (k int32 ids, k float32
    weights) all-gathered and the outputs reduce-scattered home in float32; backward, the transposes
    (the tokens' and routes' gradients reduce-scattered, the outputs' all-gathered, in float32).
    """
    from shardlib.parallel.dropless_experts import choose_transport

    cfg, sizes = layout.cfg, layout.sizes
    moe = cfg.model.moe
    transport = choose_transport(platform or "gpu", moe.dropless_transport)
    group = int(np.prod([sizes[a] for a in axes]))
    c = np.dtype(cfg.model.compute_dtype).itemsize
    t, k, d = layout.tokens_per_device, moe.top_k, cfg.model.d_model
    if transport == "ragged_all_to_all":
        copies = t * k * d * c
        out = [
            _term(
                "experts",
                "routed copies to their experts and back (forward, ragged)",
                "all-to-all",
                axes,
                sizes,
                copies,
                2 * forwards,
                False,
                note="balanced routing; skewed routing sends up to all of them",
            ),
            _term(
                "experts", "their gradients (backward, ragged)", "all-to-all", axes, sizes, copies, 2 * backwards, False
            ),
        ]
        return [term for term in out if term is not None]
    tokens, routes, summed = group * t * d * c, group * t * k * 8, group * t * d * 4
    what = "dropless fallback (XLA:CPU has no ragged-all-to-all)"
    out = [
        _term("experts", f"tokens gathered: {what}", "all-gather", axes, sizes, tokens + routes, forwards, False),
        _term("experts", "outputs summed home (float32)", "reduce-scatter", axes, sizes, summed, forwards, False),
        _term(
            "experts",
            "tokens' and routes' gradients summed home (float32)",
            "reduce-scatter",
            axes,
            sizes,
            group * t * d * 4 + group * t * k * 4,
            backwards,
            False,
        ),
        _term("experts", "outputs' gradients gathered (float32)", "all-gather", axes, sizes, summed, backwards, False),
    ]
    return [term for term in out if term is not None]
