"""Parameter and gradient traffic of the analytic model: data parallel, FSDP, HSDP and DiLoCo terms.

Contract: ``gradient_terms(layout, platform)`` returns the gradient
reductions over the token axes and FSDP's parameter gathers (the embedding
lookup's exchanges included); ``diloco_terms(layout, terms)`` rewrites
``terms`` as DiLoCo's inner steps move them and adds the outer all-reduce
(and averaged moments) per step. Formulas: ``analytic``'s docstring.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shardlib.analysis.report.collectives import wire_bytes
from shardlib.analysis.report.layout import Layout, ParamLayout
from shardlib.analysis.report.terms import Term, _term
from shardlib.parallel.reduction import lookup_gathers_table


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
