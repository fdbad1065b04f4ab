"""One report: the compiled step's communication, memory and FLOPs beside the analytic model.

``build_report`` joins three sources for one config on one mesh:

* the analytic model (``analytic.predict_terms``, ``memory.estimate_memory``),
  always, from axis sizes alone;
* the measurement of the compiled step (``measure.measure``), when compiled;
* a hardware profile's time estimate (``hardware.estimate_time``), when given.

Per mesh axis it lists measured and predicted wire bytes and their ratio.
A ratio above 1 means XLA (or the rules) move more than the model's minimum;
the report then names the collectives responsible, and what is avoidable
about them (an all-reduce whose result is only sliced, addends reduced
separately), with the ratio those would leave.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

from shardlib.analysis.report.analytic import predict_terms
from shardlib.analysis.report.collectives import Collective, split_by_axis
from shardlib.analysis.report.compute import hardware_flops, model_flops, pipeline_bubble
from shardlib.analysis.report.hardware import Profile, TimeEstimate, estimate_time
from shardlib.analysis.report.layout import Layout
from shardlib.analysis.report.measure import Measured
from shardlib.analysis.report.memory import MemoryEstimate, activation_dtype_on, estimate_memory
from shardlib.analysis.report.terms import Term, per_axis
from shardlib.core.units import format_bytes

RATIO_SLACK = 0.02  # ratios within 2% of 1 need no explanation


def check_mfu(mfu: float | None) -> None:
    """Raises ValueError unless ``mfu`` is None or a utilisation in (0, 1].

    The compute time divides by it: 0 or less gives an infinite or negative
    step, above 1 a device faster than its peak; both rank plans wrongly
    without any error of their own.
    """
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"--mfu is a fraction of the peak in (0, 1] (e.g. 0.4), got {mfu}")


def short_op_name(op_name: str) -> str:
    """``jit(step)/transpose(jvp())/while/body/closed_call/bld,df->blf/dot_general`` -> ``backward in loop: bld,df->blf``."""
    if not op_name:
        return "?"
    first = op_name.split(";")[0]
    phase = "backward" if "transpose(" in first else "forward" if "jvp(" in first else "step"
    where = " in loop" if "while/body" in first else ""
    parts = [
        p
        for p in re.split(r"[/:()]", first)
        if p
        and p
        not in {
            "jit",
            "step",
            "jvp",
            "transpose",
            "while",
            "body",
            "closed_call",
            "checkpoint",
            "rematted_computation",
            "dot_general",
            "_take",
        }
    ]
    what = parts[-1] if parts else first
    return f"{phase}{where}: {what}"


@dataclasses.dataclass(frozen=True)
class AxisRow:
    axis: str
    size: int
    measured: float | None
    avoidable: float | None
    predicted: float
    link: str | None = None
    time_s: float | None = None
    responsible: tuple[str, ...] = ()

    @property
    def ratio(self) -> float | None:
        if self.measured is None or not self.predicted:
            return None
        return self.measured / self.predicted

    @property
    def ratio_without_avoidable(self) -> float | None:
        if self.measured is None or not self.predicted:
            return None
        return (self.measured - (self.avoidable or 0.0)) / self.predicted

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ratio": self.ratio, "ratio_without_avoidable": self.ratio_without_avoidable}


@dataclasses.dataclass
class Report:
    config: str
    mesh: str
    layout: Layout
    terms: list[Term]
    memory: MemoryEstimate
    measured: Measured | None
    time: TimeEstimate | None
    axes: list[AxisRow]
    notes: list[str]
    memory_as_compiled: MemoryEstimate | None = None  # the model at the dtype the compiled platform computes in

    @property
    def sharding(self) -> str:
        return self.layout.sharding

    @property
    def predicted_total(self) -> float:
        return sum(r.predicted for r in self.axes)

    @property
    def measured_total(self) -> float | None:
        return None if self.measured is None else sum(r.measured or 0.0 for r in self.axes)

    def per_strategy(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            out[t.strategy] += t.wire_bytes
        return dict(out)

    def per_kind(self) -> dict[str, dict]:
        """Measured collectives grouped by kind and group label: count per step and bytes."""
        out: dict[str, dict] = {}
        for c in self.measured.collectives if self.measured else []:
            row = out.setdefault(
                f"{c.kind} over {c.axes_label}",
                {"kind": c.kind, "axes": c.axes_label, "ops": 0, "count": 0, "wire_bytes": 0.0, "avoidable": 0.0},
            )
            row["ops"] += 1
            row["count"] += c.count
            row["wire_bytes"] += c.total_wire_bytes
            row["avoidable"] += c.excess_wire_bytes * c.count
        return out

    def flops(self) -> dict[str, float | None]:
        return {
            "model_per_device": model_flops(self.layout),
            "hardware_per_device": hardware_flops(self.layout),
            "compiled_dots_per_device": self.measured.dot_flops if self.measured else None,
            "xla_cost_analysis_per_device": self.measured.xla_flops if self.measured else None,
        }


def _axis_measured(collectives: list[Collective], sizes) -> tuple[dict[str, float], dict[str, float]]:
    measured: dict[str, float] = defaultdict(float)
    avoidable: dict[str, float] = defaultdict(float)
    for c in collectives:
        shares = c.per_axis(sizes)
        total = sum(shares.values())
        for axis, value in shares.items():
            measured[axis] += value
            if total:
                avoidable[axis] += c.excess_wire_bytes * c.count * value / total
    return dict(measured), dict(avoidable)


def _responsible(collectives: list[Collective], axis: str, sizes, limit: int = 3) -> tuple[str, ...]:
    """The collectives on ``axis`` worth naming: avoidable bytes first, then the largest."""
    on_axis = [c for c in collectives if axis in c.axes and c.total_wire_bytes > 0]
    ranked = sorted(on_axis, key=lambda c: (-(c.excess_wire_bytes * c.count), -c.total_wire_bytes))
    out = []
    for c in ranked[:limit]:
        share = c.per_axis(sizes).get(axis, 0.0)
        text = f"{c.kind} {c.name} ({short_op_name(c.op_name)}) x{c.count}: {fmt_bytes(share)}"
        if c.inefficiency:
            text += f"; {c.inefficiency}, avoidable {fmt_bytes(c.excess_wire_bytes * c.count)}"
        out.append(text)
    return tuple(out)


def build_report(
    layout: Layout,
    *,
    config: str = "",
    mesh: str = "",
    measured: Measured | None = None,
    profile: Profile | None = None,
    mfu: float | None = None,
    across: dict[str, int] | None = None,
) -> Report:
    """Analytic model for ``layout``, beside the measurement and a time estimate when given.

    With a measurement, the prediction is for the platform it compiled on (a pipeline's branching).
    """
    terms = predict_terms(layout, measured.platform if measured is not None else None)
    predicted = per_axis(terms, layout.sizes)
    time = None
    if profile is not None:
        time = estimate_time(
            terms,
            layout.sizes,
            hardware_flops(layout),
            layout.cfg.model.compute_dtype,
            profile,
            n_layers=layout.cfg.model.n_layers,
            mfu=mfu,
            across=across,
            bubble=pipeline_bubble(layout),
        )
    measured_axes, avoidable = _axis_measured(measured.collectives, layout.sizes) if measured else ({}, {})
    rows = []
    for axis, size in layout.sizes.items():
        if size < 2:
            continue
        row = AxisRow(
            axis,
            size,
            measured_axes.get(axis, 0.0) if measured else None,
            avoidable.get(axis, 0.0) if measured else None,
            predicted.get(axis, 0.0),
            link=time.link_per_axis.get(axis) if time else None,
            time_s=time.comm_s_per_axis.get(axis) if time else None,
        )
        if measured and (row.ratio is None or row.ratio > 1 + RATIO_SLACK):
            row = dataclasses.replace(row, responsible=_responsible(measured.collectives, axis, layout.sizes))
        rows.append(row)
    report = Report(config, mesh, layout, terms, estimate_memory(layout), measured, time, rows, [])
    if measured is not None:
        dtype = activation_dtype_on(measured.platform, layout.cfg.model.compute_dtype)
        report.memory_as_compiled = estimate_memory(layout, dtype)
    report.notes = _notes(report)
    return report


def _notes(report: Report) -> list[str]:
    layout, measured = report.layout, report.measured
    cfg = layout.cfg
    notes = []
    for axis in layout.unused_axes():
        notes.append(
            f"mesh axis {axis} (size {layout.sizes[axis]}) shards nothing under preset {layout.sharding}: its devices repeat each other's work"
        )
    if cfg.grad_accum > 1 and layout.token_axes:
        scatters = sum(t.wire_bytes for t in report.terms if t.strategy == "fsdp" and t.kind == "reduce-scatter")
        note = f"grad_accum={cfg.grad_accum}: the gradient all-reduces run once per step, after the last microbatch"
        if scatters:
            note += (
                f"; FSDP's reduce-scatters run every microbatch ({fmt_bytes(scatters)} per step), with its gathers: "
                "reducing them once would hold whole gradients across microbatches"
            )
        notes.append(note)
    if layout.sizes["expert"] > 1 and not getattr(getattr(cfg.model, "moe", None), "n_experts", 0):
        notes.append(
            "experts: the model has no MoE layers (model.moe.n_experts: 0); the expert axis only splits the batch, so no all-to-all is predicted"
        )
    if (
        any(t.strategy == "fsdp" and t.kind == "all-gather" for t in report.terms)
        and cfg.model.compute_dtype != cfg.model.param_dtype
    ):
        notes.append(
            f"fsdp: parameters are gathered in {cfg.model.param_dtype} and cast to {cfg.model.compute_dtype} at use; "
            "casting before gathering would halve the gathers (the model predicts them in the parameter dtype)"
        )
    if layout.seq_shards > 1:
        notes.append(_sequence_note(layout, report.terms))
    if measured is None:
        return notes
    if measured.unknown_trip_counts:
        notes.append(
            f"{measured.unknown_trip_counts} loop(s) without a known trip count were counted once: their collectives are undercounted"
        )
    avoidable = sum(c.excess_wire_bytes * c.count for c in measured.collectives)
    if avoidable:
        kinds = sorted({c.inefficiency for c in measured.collectives if c.inefficiency})
        notes.append(
            f"avoidable traffic {fmt_bytes(avoidable)} per step ({'; '.join(kinds)}). XLA's GPU pipeline has passes that "
            f"remove them (ReduceScatterCreator: all-reduce then slice; AllReduceReassociate: summed addends; "
            f"gpu_compiler.cc); XLA:CPU runs neither"
            + ("" if measured.platform == "cpu" else f"; this {measured.platform} compile kept them")
        )
    notes += _split_reduction_notes(report)
    for row in report.axes:
        if row.measured and not row.predicted:
            notes.append(
                f"{row.axis}: {fmt_bytes(row.measured)} measured where the model predicts nothing (see the collectives "
                f"named above: the partitioner's choice, e.g. for the embedding lookup)"
            )
        ratio = row.ratio_without_avoidable
        if ratio is not None and ratio < 1 - RATIO_SLACK:
            notes.append(
                f"{row.axis}: {ratio:.2f} of the model without the avoidable traffic: XLA moved less than the model "
                "expects (e.g. it kept a gathered copy for the backward pass the model counts twice)"
            )
    if measured.xla_flops and measured.dot_flops and abs(measured.xla_flops / measured.dot_flops - 1) > 0.1:
        notes.append(
            f"cost_analysis() reports {measured.xla_flops:.3g} FLOPs per device, the compiled dots times their trip "
            f"counts {measured.dot_flops:.3g}: it counts each loop body once"
        )
    return notes


_RING = "attention.impl=ring moves about the same bytes in permutes overlapped with compute, holding 1/seq of K and V"


def _sequence_note(layout: Layout, terms: list[Term]) -> str:
    """What the configured attention implementation moves over ``seq``, against the model's K/V terms.

    The model predicts one gather of K and V forward, one backward and a
    reduce-scatter of their gradients, whatever the implementation; the note
    says where the configured one departs from that, so a ratio off 1 on
    ``seq`` is not a mystery.
    """
    impl = layout.cfg.attention.impl
    if impl == "ulysses":
        return _ulysses_note(layout)
    if layout.sizes["pipe"] > 1 and impl != "ring":
        return (
            f"sequence: inside the pipeline's stages (seq manual) attention.impl={impl} runs the all-gather "
            "kernel: K and V gathered over seq on every forward (F, and B's recomputation), their gradients "
            "reduce-scattered in float32; on XLA:CPU (select branching) every used branch runs every tick"
        )
    if impl == "ring":
        p = layout.seq_shards
        scatter = sum(t.wire_bytes for t in terms if t.strategy == "sequence" and t.kind == "reduce-scatter")
        return (
            f"sequence: attention.impl=ring passes K and V blocks round seq in seq-1 permutes forward and again "
            f"backward, overlapped with the attention compute; their gradients take seq permutes, one more than "
            f"a reduce-scatter, to come home to their owners: {fmt_bytes(scatter / (p - 1))} per step beyond the model"
        )
    if impl == "allgather":
        return (
            "sequence: attention.impl=allgather all-gathers K and V over seq and reduce-scatters their gradients; "
            "unless remat recomputes the layer it keeps the gathered copy for the backward pass, where the model "
            f"counts a second gather (seq can read below 1); {_RING}"
        )
    return f"sequence: attention.impl={impl} leaves attention to XLA, which all-gathers K and V over seq; {_RING}"


def _ulysses_note(layout: Layout) -> str:
    p = layout.seq_shards
    u = layout.cfg.attention.ulysses_degree or p
    head = (
        f"sequence: attention.impl=ulysses trades the sequence split for a head split with 4 all-to-alls per layer "
        f"forward (q, k, v in, the output back) and 4 backward, over groups of {u} devices"
    )
    if u == p:
        return f"{head}; the bytes per device shrink as 1/seq, where the ring's stay (seq-1)/seq of K and V"
    return f"{head}, then the ring across the {p // u} groups on their K and V (seq-1 permutes, as impl=ring)"


def _reduction_groups(terms: list[Term], sizes) -> list[tuple[str, ...]]:
    """Axis groups of the predicted gradient all-reduces that span more than one mesh axis."""
    groups = []
    for t in terms:
        axes = tuple(a for a in t.axes if sizes.get(a, 1) > 1)
        if t.strategy == "data parallel" and t.kind == "all-reduce" and len(axes) > 1 and axes not in groups:
            groups.append(axes)
    return groups


def split_reduction_excess(collectives: list[Collective], group: tuple[str, ...], sizes) -> dict[str, tuple]:
    """Per axis: (excess bytes, the collectives) of all-reduces over part of ``group`` that move too much.

    XLA:CPU reduces a gradient summed over several axes (data and seq) as
    one full all-reduce per axis, one feeding the next. The inner axis's
    reduction moves what the hierarchical minimum puts on it, but each outer
    one reduces the whole buffer again, where a reduction over the group
    (or reduce-scatter, reduce the piece, all-gather) moves only its 1/n
    piece over that axis. The excess is this op's bytes on the axis beyond
    ``split_by_axis`` of the same buffer over the whole ``group``.
    """
    out: dict[str, tuple[float, list[Collective]]] = {}
    for c in collectives:
        if c.kind != "all-reduce" or not c.exact_axes or not c.axes or not set(c.axes) < set(group):
            continue
        minimum = split_by_axis("all-reduce", c.buffer_bytes, group, sizes)
        for axis, moved in c.per_axis(sizes).items():
            extra = moved - minimum.get(axis, 0.0) * c.count
            if extra > RATIO_SLACK * moved:
                total, ops = out.get(axis, (0.0, []))
                out[axis] = (total + extra, [*ops, c])
    return out


def _split_reduction_notes(report: Report) -> list[str]:
    """Explains an axis ratio above 1 that comes from reducing the gradients one axis at a time."""
    sizes, notes = report.layout.sizes, []
    rows = {r.axis: r for r in report.axes}
    for group in _reduction_groups(report.terms, sizes):
        for axis, (excess, ops) in split_reduction_excess(report.measured.collectives, group, sizes).items():
            row = rows.get(axis)
            # Scalars (the loss, norms) reduced over one axis are no gradient reduced twice.
            if row is None or row.ratio is None or excess < RATIO_SLACK * row.predicted:
                continue
            inner = "+".join(a for a in group if a != axis)
            names = ", ".join(c.name for c in ops[:3]) + (f" and {len(ops) - 3} more" if len(ops) > 3 else "")
            rest = (row.measured - excess - (row.avoidable or 0.0)) / row.predicted
            notes.append(
                f"{axis}: ratio {row.ratio:.2f} because the gradients summed over {'+'.join(group)} are reduced "
                f"as separate full all-reduces, one over {inner}, then the whole result again over {axis} "
                f"({names}): {axis} carries the whole gradient, {fmt_bytes(excess)} per step beyond the model, "
                f"whose prediction is the minimum (one all-reduce over {'+'.join(group)}, or reduce-scatter over "
                f"{inner}, all-reduce of the piece over {axis}, all-gather over {inner}); without it {axis} "
                f"would be {rest:.2f}. XLA's GPU pipeline folds chained all-reduces into one (AllReduceFolder, "
                "gpu_compiler.cc); XLA:CPU does not"
            )
    return notes


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return format_bytes(n, digits=2)
