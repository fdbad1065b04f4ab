"""The data type of the analytic model: one ``Term`` of predicted traffic, its constructor and per-axis sums.

Contract: a ``Term`` is one kind of collective a step makes, with its group,
message and op count and the wire bytes per device per step they come to;
``_term`` builds one from the mesh sizes (None when it moves nothing);
``per_axis`` attributes terms' bytes to mesh axes as measured ones are
(``collectives.split_by_axis``). No strategy lives here.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from shardlib.analysis.report.collectives import split_by_axis, wire_bytes


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


def per_axis(terms: list[Term], sizes) -> dict[str, float]:
    """Predicted wire bytes per step per mesh axis."""
    out: dict[str, float] = defaultdict(float)
    for term in terms:
        for axis, value in term.per_axis(sizes).items():
            out[axis] += value
    return dict(out)
