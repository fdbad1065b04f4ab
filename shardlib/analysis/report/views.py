"""Views of a report a person or a tool reads: the terminal tables and JSON."""

from __future__ import annotations

from collections.abc import Sequence

from shardlib.analysis.report.hardware import format_seconds
from shardlib.analysis.report.report import RATIO_SLACK, AxisRow, Report, fmt_bytes

# Under the axes table when no --hardware was given: what fills its last two columns.
LINK_TIME_HINT = "    link, time: --hardware h100 (or h200, or a profile YAML) fills them: the link each axis crosses, its time a step"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    """Left-aligned text columns (numbers right-aligned) under a dashed header."""
    cells = [[str(c) for c in header]] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and cells[1:] for i in range(len(header))]

    def line(row):
        return (
            indent
            + "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        )

    return [line(cells[0]), indent + "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].replace(".", "", 1).replace("x", "", 1).lstrip("-")
    return head.isdigit() or text == "-"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_report(report: Report) -> str:
    """The whole report as text for a terminal: the verdict line first, then the header and the tables."""
    out = [verdict(report), "", _header(report), ""]
    out += _axes_lines(report)
    if report.measured is not None:
        out += ["", *_measured_lines(report)]
    out += ["", *_predicted_lines(report)]
    out += ["", "memory per device"] + _memory_lines(report)
    out += ["", "FLOPs per step and device"] + _flops_lines(report)
    if report.time is not None:
        out += ["", *_time_lines(report)]
    if report.notes:
        out += ["", "notes"] + [f"  - {n}" for n in report.notes]
    return "\n".join(out)


def _header(report: Report) -> str:
    lay, m = report.layout, report.measured
    shown = " x ".join(f"{a}={n}" for a, n in lay.sizes.items() if n > 1) or "one device"
    how = f"compiled for {m.platform} in {m.compile_seconds:.1f} s" if m else "analytic only (not compiled)"
    return (
        f"{report.config} on {report.mesh} ({shown}) | preset {lay.sharding} | "
        f"{lay.cfg.model.num_params():,} params | {lay.cfg.batch_size} x {lay.cfg.seq_len} tokens, "
        f"grad_accum {lay.cfg.grad_accum} | {how}"
    )


def _axes_lines(report: Report) -> list[str]:
    """Bytes per mesh axis, measured beside predicted, and what is behind any excess."""
    out = ["communication per step and device, by mesh axis (wire bytes; ratio = measured / predicted)"]
    rows = [
        [
            r.axis,
            r.size,
            fmt_bytes(r.measured),
            fmt_bytes(r.avoidable),
            fmt_bytes(r.predicted),
            _ratio(r.ratio),
            _ratio(r.ratio_without_avoidable),
            r.link or "-",
            format_seconds(r.time_s) if r.time_s is not None else "-",
        ]
        for r in report.axes
    ]
    if not rows:
        return [*out, "  (one device: nothing to communicate)"]
    out += table(["axis", "size", "measured", "avoidable", "predicted", "ratio", "w/o avoidable", "link", "time"], rows)
    if report.time is None:
        out.append(LINK_TIME_HINT)
    if report.measured is None:
        out.append("    measured, avoidable, ratio: compiling the step fills them (without --no-compile)")
    out += [f"    {r.axis} > 1: {text}" for r in report.axes for text in r.responsible]
    return out


# --------------------------------------------------------------------------- the verdict


def verdict(report: Report) -> str:
    """One line: where a step's bytes go (wire and memory), what is above the minimum and why, the time."""
    parts = [_where_the_bytes_go(report), _above_the_minimum(report), _memory_in_brief(report)]
    if report.time is not None:
        t = report.time
        parts.append(
            f"step {format_seconds(t.step_s)} on {t.profile} ({format_seconds(t.exposed_s)} of it exposed communication)"
        )
    return "verdict: " + "; ".join(p for p in parts if p)


def _where_the_bytes_go(report: Report) -> str:
    if not report.axes:
        return "one device: nothing to communicate"
    measured = report.measured is not None
    moved = {r.axis: (r.measured if measured else r.predicted) or 0.0 for r in report.axes}
    total = sum(moved.values())
    if not total:
        return "nothing crosses the wire"
    axis = max(moved, key=moved.get)
    what = "measured" if measured else "predicted"
    return f"{fmt_bytes(total)} a step per device over the wire ({what}), {moved[axis] / total:.0%} over {axis}" + (
        _strategy_share(report, axis)
    )


def _strategy_share(report: Report, axis: str) -> str:
    """`` (tensor parallel: 80% of the bytes predicted there)``: the strategy that puts the most bytes on ``axis``."""
    by_strategy: dict[str, float] = {}
    for term in report.terms:
        by_strategy[term.strategy] = by_strategy.get(term.strategy, 0.0) + term.per_axis(report.layout.sizes).get(
            axis, 0.0
        )
    total = sum(by_strategy.values())
    if not total:
        return ""
    strategy = max(by_strategy, key=by_strategy.get)
    return f" ({strategy}: {by_strategy[strategy] / total:.0%} of the bytes predicted there)"


def _excess(row: AxisRow) -> float:
    return (row.measured or 0.0) - row.predicted


def _above_the_minimum(report: Report) -> str:
    """The axis furthest above the analytic model (the minimum), and what the report says is behind it."""
    if not report.axes:
        return ""
    if report.measured is None:
        return "not compiled, so nothing is measured against the minimum (the analytic model): drop --no-compile"
    over = [r for r in report.axes if r.measured and (not r.predicted or r.measured > (1 + RATIO_SLACK) * r.predicted)]
    if not over:
        return f"every axis within {RATIO_SLACK:.0%} of the minimum (the analytic model) or below it"
    row = max(over, key=_excess)
    if not row.predicted:
        head = f"{row.axis} moves {fmt_bytes(row.measured)} where the minimum is nothing"
    else:
        head = f"{row.axis} moves {row.ratio:.2f}x the minimum (+{fmt_bytes(_excess(row))})"
    if row.avoidable:
        kinds = sorted({c.inefficiency for c in report.measured.collectives if c.inefficiency and row.axis in c.axes})
        why = (
            f"{fmt_bytes(row.avoidable)} of it avoidable: {', '.join(kinds)}"
            if kinds
            else f"{fmt_bytes(row.avoidable)} avoidable"
        )
    else:
        why = "the collectives under the axes table and the notes say why"
    others = f"; {len(over) - 1} more axes above it" if len(over) > 1 else ""
    return f"{head}, {why}{others}"


def _memory_in_brief(report: Report) -> str:
    e = report.memory
    parts = {
        "parameters": e.params,
        "gradients": e.grads,
        "optimizer state": e.optimizer,
        "DiLoCo state": e.outer,
        "the batch": e.batch,
        "FSDP's gathered layer": e.gathered,
        "activations": e.activations,
        "logits and the working layer": e.working,
    }
    largest = max(parts, key=parts.get)
    compiled = report.measured.memory if report.measured else None
    peak = f", {fmt_bytes(compiled.peak)} compiled" if compiled is not None else ""
    return f"memory {fmt_bytes(e.total)} per device predicted{peak}, most of it {largest} ({fmt_bytes(parts[largest])})"


def _measured_lines(report: Report) -> list[str]:
    out = ["measured collectives by kind (runs per step: loop bodies times their trip counts)"]
    kinds = report.per_kind()
    if not kinds:
        return [*out, "  (none)"]
    rows = [
        [k["kind"], k["axes"], k["ops"], k["count"], fmt_bytes(k["wire_bytes"]), fmt_bytes(k["avoidable"])]
        for k in kinds.values()
    ]
    return out + table(["kind", "over", "ops", "runs/step", "bytes/step", "avoidable"], rows)


def _predicted_lines(report: Report) -> list[str]:
    out = ["predicted (analytic model)"]
    if not report.terms:
        return [*out, "  (nothing)"]
    rows = [
        [
            t.strategy,
            t.what,
            t.kind,
            "+".join(t.axes),
            t.count,
            fmt_bytes(t.message_bytes),
            fmt_bytes(t.wire_bytes),
            "yes" if t.overlappable else "no",
        ]
        for t in report.terms
    ]
    return out + table(["strategy", "traffic", "kind", "over", "ops/step", "message", "bytes/step", "overlap"], rows)


def _memory_lines(report: Report) -> list[str]:
    e = report.memory
    rows = [
        ["parameters", fmt_bytes(e.params)],
        [
            "gradients" + (" + accumulator" if report.layout.cfg.grad_accum > 1 else "") + " + update temporaries",
            fmt_bytes(e.grads),
        ],
        ["optimizer state (AdamW moments)", fmt_bytes(e.optimizer)],
        *([["DiLoCo: anchor + outer momentum (+ residuals)", fmt_bytes(e.outer)]] if e.outer else []),
        ["batch", fmt_bytes(e.batch)],
        ["FSDP: one gathered layer + its gradient", fmt_bytes(e.gathered)],
        ["activations (residuals of all layers)", fmt_bytes(e.activations)],
        ["logits / recomputed layer", fmt_bytes(e.working)],
        ["total (ideal)", fmt_bytes(e.total)],
        ["eval step, beside the state: its batch and working set", fmt_bytes(e.eval_total)],
    ]
    lines = table(["", "predicted"], rows)
    c = report.measured.memory if report.measured else None
    if c is not None:
        same = report.memory_as_compiled or e
        lines.append(
            f"  compiled: arguments {fmt_bytes(c.arguments)} + outputs {fmt_bytes(c.outputs)} - aliased "
            f"{fmt_bytes(c.aliased)} + temporaries {fmt_bytes(c.temporaries)} = {fmt_bytes(c.peak)}"
        )
        if same.activations != e.activations:
            lines.append(
                f"  {report.measured.platform} computes {report.layout.cfg.model.compute_dtype} in float32: the model "
                f"with float32 activations predicts {fmt_bytes(same.total)}"
            )
        lines.append(
            f"  predicted / compiled = {same.total / c.peak:.2f} (state {fmt_bytes(same.state)} vs arguments "
            f"{fmt_bytes(c.arguments)})"
        )
    return lines


def _flops_lines(report: Report) -> list[str]:
    f = report.flops()
    lines = [f"  model (6 x params + attention per token): {f['model_per_device']:.4g}"]
    lines.append(f"  executed (with remat recompute): {f['hardware_per_device']:.4g}")
    if f["compiled_dots_per_device"] is not None:
        dots = f["compiled_dots_per_device"]
        lines.append(f"  compiled dots x trip counts: {dots:.4g} (/ executed = {dots / f['hardware_per_device']:.3f})")
    if f["xla_cost_analysis_per_device"] is not None:
        lines.append(f"  XLA cost_analysis: {f['xla_cost_analysis_per_device']:.4g}")
    return lines


def _time_lines(report: Report) -> list[str]:
    t = report.time
    axes = ", ".join(f"{a} {format_seconds(s)} ({t.link_per_axis[a]})" for a, s in t.comm_s_per_axis.items()) or "none"
    return [
        f"time per step on {t.profile} at MFU {t.mfu:.2f}",
        f"  compute {format_seconds(t.compute_s)}; communication {format_seconds(t.comm_s)}: {axes}",
        (
            f"  exposed {format_seconds(t.exposed_s)} (critical path {format_seconds(t.critical_s)}, "
            f"overlappable {format_seconds(t.overlappable_s)} behind {format_seconds(t.compute_s)} of compute)"
        ),
        f"  step {format_seconds(t.step_s)}",
    ]


def report_json(report: Report) -> dict:
    """Everything in the report as plain JSON-able data."""
    lay = report.layout
    m = report.measured
    return {
        "config": report.config,
        "mesh": report.mesh,
        "sizes": lay.sizes,
        "sharding": lay.sharding,
        "params": lay.cfg.model.num_params(),
        "axes": [r.as_dict() for r in report.axes],
        "predicted_terms": [t.as_dict() for t in report.terms],
        "predicted_per_strategy": report.per_strategy(),
        "measured": None
        if m is None
        else {
            "platform": m.platform,
            "compile_seconds": m.compile_seconds,
            "collectives": [c.as_dict() for c in m.collectives],
            "per_kind": list(report.per_kind().values()),
            "memory": m.memory.as_dict() if m.memory else None,
            "unknown_trip_counts": m.unknown_trip_counts,
        },
        "memory_predicted": report.memory.as_dict(),
        "flops": report.flops(),
        "time": report.time.as_dict() if report.time else None,
        "notes": report.notes,
    }
