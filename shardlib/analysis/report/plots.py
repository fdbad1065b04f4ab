"""PNG plots of reports: bytes per strategy and axis, message sizes, and a sweep over a config key.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot
state, no display needed), like ``shardlib.training.metrics.plot_loss_curve``.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from shardlib.analysis.report.report import Report


def _figure(size=(9, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _title(report: Report) -> str:
    shown = " x ".join(f"{a}={n}" for a, n in report.layout.sizes.items() if n > 1) or "1 device"
    return f"{report.config} on {shown}, {report.layout.sharding}"


def plot_bytes(report: Report, path: pathlib.Path) -> pathlib.Path:
    """Left: predicted bytes per strategy. Right: measured against predicted per mesh axis."""
    fig = _figure()
    left, right = fig.subplots(1, 2)
    strategies = report.per_strategy()
    names = list(strategies) or ["none"]
    left.bar(names, [strategies.get(n, 0) / 2**20 for n in names], color="tab:blue")
    left.set_ylabel("MiB per device per step")
    left.set_title("predicted, per strategy")
    left.tick_params(axis="x", rotation=20)
    axes = [r.axis for r in report.axes] or ["none"]
    x = np.arange(len(axes))
    right.bar(x - 0.2, [r.predicted / 2**20 for r in report.axes] or [0], 0.4, label="predicted")
    if report.measured is not None:
        right.bar(x + 0.2, [(r.measured or 0) / 2**20 for r in report.axes] or [0], 0.4, label="measured")
        right.bar(
            x + 0.2,
            [(r.avoidable or 0) / 2**20 for r in report.axes] or [0],
            0.4,
            label="avoidable part",
            fill=False,
            hatch="//",
            edgecolor="black",
        )
    right.set_xticks(x, axes)
    right.set_title("per mesh axis")
    right.legend()
    fig.suptitle(_title(report))
    return _save(fig, path)


def plot_message_sizes(report: Report, path: pathlib.Path) -> pathlib.Path:
    """Histogram of message sizes (bytes per op and device), weighted by runs per step, by collective kind."""
    sizes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    if report.measured is not None:
        for c in report.measured.collectives:
            if c.buffer_bytes > 0:
                sizes[c.kind].append((c.buffer_bytes, c.count))
        source = "compiled program"
    else:
        for t in report.terms:
            sizes[t.kind].append((t.message_bytes, t.count))
        source = "analytic model"
    fig = _figure((8, 4.5))
    ax = fig.subplots()
    everything = [s for values in sizes.values() for s, _ in values]
    if everything:
        bins = np.logspace(np.log10(max(min(everything), 1)) - 0.1, np.log10(max(everything)) + 0.1, 30)
        kinds = sorted(sizes)
        ax.hist(
            [[s for s, _ in sizes[k]] for k in kinds],
            bins=bins,
            weights=[[n for _, n in sizes[k]] for k in kinds],
            stacked=True,
            label=kinds,
        )
        ax.set_xscale("log")
        ax.legend()
    ax.set_xlabel("message size (bytes per device)")
    ax.set_ylabel("collectives per step")
    ax.set_title(f"message sizes ({source}): {_title(report)}")
    return _save(fig, path)


def plot_sweep(key: str, values: Sequence[object], reports: Sequence[Report], path: pathlib.Path) -> pathlib.Path:
    """Wire bytes per mesh axis against the swept config value: predicted dashed, measured solid."""
    fig = _figure((8, 4.5))
    ax = fig.subplots()
    axes = sorted({r.axis for rep in reports for r in rep.axes})
    numeric = all(isinstance(v, int | float) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    for i, axis in enumerate(axes):
        color = f"C{i}"
        pred = [next((r.predicted for r in rep.axes if r.axis == axis), 0) / 2**20 for rep in reports]
        ax.plot(xs, pred, "--", color=color, label=f"{axis} predicted")
        if all(rep.measured is not None for rep in reports):
            meas = [next(((r.measured or 0) for r in rep.axes if r.axis == axis), 0) / 2**20 for rep in reports]
            ax.plot(xs, meas, "o-", color=color, label=f"{axis} measured")
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    elif len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("MiB per device per step")
    ax.set_title(f"communication per axis against {key}: {reports[0].config if reports else ''}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
