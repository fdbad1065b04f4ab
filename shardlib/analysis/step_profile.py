"""Where a step's time goes, read off a ``jax.profiler`` trace: percent of the step by op category.

    python -m shardlib.analysis.step_profile TRACE_DIR [--hlo train_step.hlo.txt] [--steps N] [--json F]

``bench/throughput.py --trace DIR --hlo DIR`` writes both inputs and prints
this breakdown itself; this command reads a trace fetched from elsewhere (a
GPU machine) without one.

What it reads: the device's timeline in the trace's XSpace file
(``*.xplane.pb``), through ``jax.profiler.ProfileData``. On a GPU that is the
device plane's kernel and copy events; on the CPU backend, which has no
device plane, the host threads' events that carry an ``hlo_op`` (XLA:CPU's
thunks). Each op gets a category (``shardlib.analysis.op_categories``): from
the compiled module's text where it is given, else from the kernel's name.

How it counts: the window runs from the first op's start to the last op's
end. Every instant of it goes to one category, the first active in
``CATEGORIES``' order (compute before communication), or to ``idle`` when
nothing runs: so the percentages sum to 100, ``collective`` is the
communication that no compute hides, and ``idle`` is the device waiting on
the host (host gaps between steps, or inside a step). ``busy_ms`` is each
category's own time with overlap, for comparison. The trace must hold only
the steps it is asked about (``--steps``): ``bench/throughput.py`` traces
steps it does not time, because the profiler slows what it watches.

Why not TensorBoard's profile plugin or xprof: neither is in the project's
dependencies, and both answer by op name, not by the categories that decide
what to change; this reader is the projection we need and nothing more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections import Counter, defaultdict

from shardlib.analysis.op_categories import CATEGORIES, CONTAINER, hlo_categories, name_category

IDLE = "idle"
# Lines of a device plane that repeat its events at a coarser grain (present in processed traces).
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework", "Source code")


@dataclasses.dataclass(frozen=True)
class OpEvent:
    """One op on the device's timeline: its name (HLO instruction, else kernel), category and span."""

    name: str
    category: str
    start_ns: float
    end_ns: float


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """The breakdown of ``steps`` traced steps, per step.

    exclusive_ms: category (and ``idle``) -> milliseconds per step, each instant counted once;
      sums to ``window_ms``.
    busy_ms: category -> milliseconds per step that any op of it runs (overlap counted in each).
    top_ops: the ops that take the most time: (name, category, ms per step, runs per step).
    """

    source: str
    steps: int
    window_ms: float
    exclusive_ms: dict[str, float]
    busy_ms: dict[str, float]
    top_ops: list[tuple[str, str, float, float]]

    def percent(self) -> dict[str, float]:
        """Category (and idle) -> percent of the step."""
        return {k: 100 * v / self.window_ms for k, v in self.exclusive_ms.items()} if self.window_ms else {}

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "percent": self.percent()}


def device_ops(xspace_path: str | pathlib.Path, categories: dict[str, str] | None = None) -> tuple[str, list[OpEvent]]:
    """(where they ran, every op of the device timeline) from an ``.xplane.pb`` file.

    ``categories``: HLO instruction name -> category (:func:`hlo_categories`); ops it does not
    name are classified by kernel name. Loops and calls, whose bodies are timed op by op, are dropped.
    """
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(xspace_path))
    devices = sorted(p.name for p in data.planes if p.name.startswith("/device:") and "CUSTOM" not in p.name)
    categories = categories or {}
    ops = []
    if devices:  # SPMD: every device runs the same program; the first one's timeline stands for all
        for line in data.find_plane_with_name(devices[0]).lines:
            if line.name not in _DERIVED_LINES:
                ops += [_op(event.name, dict(event.stats).get("hlo_op"), event, categories) for event in line.events]
        return devices[0].removeprefix("/"), [op for op in ops if op is not None]
    # The CPU backend has no device plane: its thunks run on host threads, tagged with their device.
    tagged = []
    for plane in data.planes:
        if plane.name.startswith("/host:CPU"):
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" in stats:
                        tagged.append(
                            (stats.get("device_ordinal", 0), _op(event.name, stats["hlo_op"], event, categories))
                        )
    first = min((ordinal for ordinal, _ in tagged), default=0)
    return f"host:CPU device {first}", [op for ordinal, op in tagged if ordinal == first and op is not None]


def _op(kernel: str, hlo_op, event, categories: dict[str, str]) -> OpEvent | None:
    """The event as an op (None for a loop or call, whose body's ops are timed themselves)."""
    name = str(hlo_op or kernel)
    category = categories.get(name) or name_category(kernel)
    if category == CONTAINER or event.duration_ns <= 0:
        return None
    return OpEvent(name, category, event.start_ns, event.start_ns + event.duration_ns)


def attribute(ops: list[OpEvent]) -> tuple[float, dict[str, float], dict[str, float]]:
    """(window ns, exclusive ns by category and idle, busy ns by category) of a set of ops.

    A sweep over the ops' starts and ends: between two consecutive boundaries the set of
    active categories is constant, and the interval goes to the first of them in
    ``CATEGORIES``' order, or to idle.
    """
    if not ops:
        return 0.0, {}, {}
    rank = {category: i for i, category in enumerate(CATEGORIES)}
    boundaries = sorted(
        [(op.start_ns, 1, op.category) for op in ops] + [(op.end_ns, -1, op.category) for op in ops],
        key=lambda b: (b[0], b[1]),  # ends before starts at one instant: touching ops leave no overlap
    )
    active: Counter[str] = Counter()
    exclusive: dict[str, float] = defaultdict(float)
    busy: dict[str, float] = defaultdict(float)
    previous = boundaries[0][0]
    for time_ns, delta, category in boundaries:
        span = time_ns - previous
        if span > 0:
            running = [c for c, n in active.items() if n > 0]
            exclusive[min(running, key=lambda c: rank.get(c, len(rank))) if running else IDLE] += span
            for c in running:
                busy[c] += span
        active[category] += delta
        previous = time_ns
    window = boundaries[-1][0] - boundaries[0][0]
    return window, dict(exclusive), dict(busy)


def profile_steps(trace_dir: str | pathlib.Path, hlo_text: str | None = None, steps: int = 1) -> StepProfile:
    """The per-step breakdown of the newest trace under ``trace_dir`` (a ``jax.profiler`` log dir).

    ``hlo_text``: the compiled step's HLO, to classify ops by what they compute (else by name).
    """
    path = newest_xspace(trace_dir)
    source, ops = device_ops(path, hlo_categories(hlo_text) if hlo_text else None)
    if not ops:
        raise ValueError(f"no device ops in the trace {path}: was anything run while it was recording?")
    window, exclusive, busy = attribute(ops)
    per_step = 1e-6 / steps
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for op in ops:
        entry = by_op[(op.name, op.category)]
        entry[0] += op.end_ns - op.start_ns
        entry[1] += 1
    top = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:12]
    return StepProfile(
        source=source,
        steps=steps,
        window_ms=window * per_step,
        exclusive_ms={k: v * per_step for k, v in sorted(exclusive.items(), key=lambda kv: -kv[1])},
        busy_ms={k: v * per_step for k, v in sorted(busy.items(), key=lambda kv: -kv[1])},
        top_ops=[(name, cat, ns * per_step, runs / steps) for (name, cat), (ns, runs) in top],
    )


def newest_xspace(trace_dir: str | pathlib.Path) -> pathlib.Path:
    """The most recent ``*.xplane.pb`` under a profiler log dir (``plugins/profile/<run>/<host>.xplane.pb``)."""
    found = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: not a jax.profiler trace directory")
    return found[-1]


def format_profile(profile: StepProfile) -> str:
    """A table: each category's share of the step, exclusive and with overlap, and the top ops."""
    lines = [f"step profile ({profile.source}, {profile.steps} steps): {profile.window_ms:.2f} ms per step"]
    percent = profile.percent()
    for category, ms in profile.exclusive_ms.items():
        busy = profile.busy_ms.get(category)
        overlap = f"  (running {busy:.2f} ms)" if busy is not None and busy > ms * 1.005 else ""
        lines.append(f"  {category:<14} {percent[category]:5.1f}%  {ms:8.3f} ms{overlap}")
    lines.append("  top ops (ms per step, runs per step):")
    for name, category, ms, runs in profile.top_ops:
        lines.append(f"    {ms:8.3f}  x{runs:<6g} {category:<12} {name[:80]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir", help="a jax.profiler log dir (or any folder above its .xplane.pb)")
    parser.add_argument("--hlo", help="the compiled step's HLO text, to classify ops by what they compute")
    parser.add_argument("--steps", type=int, default=1, help="how many steps the trace holds")
    parser.add_argument("--json", help="write the breakdown as JSON to this file")
    args = parser.parse_args(argv)
    try:
        hlo = pathlib.Path(args.hlo).read_text() if args.hlo else None
        profile = profile_steps(args.trace_dir, hlo, args.steps)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_profile(profile))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(profile.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
