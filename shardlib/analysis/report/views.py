"""Views of a report a person or a tool reads: the terminal tables and JSON."""

from __future__ import annotations

from collections.abc import Sequence

from shardlib.analysis.report.hardware import format_seconds
from shardlib.analysis.report.report import Report, fmt_bytes


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
    """The whole report as text for a terminal."""
    out = [_header(report), ""]
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
    out += [f"    {r.axis} > 1: {text}" for r in report.axes for text in r.responsible]
    return out


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
