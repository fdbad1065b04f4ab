"""Collectives of a compiled program in one call: a flat view over ``shardlib.analysis.report``'s HLO reader.

``collectives(text)`` lists every collective instruction of a compiled module
(``jax.jit(f).lower(*args).compile().as_text()``: the partitioned, per-device
program) with its result bytes per device and how many times it executes: an
instruction inside a ``while`` body runs ``known_trip_count`` times (nested
loops multiply), which a plain count of the text misses. ``summarize`` totals
them by kind. Parsing, trip counts, replica groups and async ``-start`` pairs
are ``shardlib.analysis.report``'s (``report/hlo.py``, ``report/groups.py``,
``report/collectives.py``); this module only reshapes its answer for tests and
benchmarks that check one collective against a formula, without a mesh.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import jax

from shardlib.analysis.report.collectives import find_collectives
from shardlib.analysis.report.groups import instruction_groups
from shardlib.analysis.report.hlo import parse_hlo

_PARTITIONS = re.compile(r"num_partitions=(\d+)")


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective instruction of a compiled module.

    bytes: result bytes per device for one execution (summed over a tuple).
    executions: how many times it runs per call of the module (product of the
      trip counts of the loops around it).
    group_size: devices per replica group; for collective-permute, the number
      of source-target pairs.
    trip_count_known: False when a loop around it has no known trip count
      (it is then counted once per call of that loop).
    op_name: JAX's name for it (``metadata={op_name=...}``): the jit and
      ``jax.named_scope`` path, so callers can attribute collectives to code.
    """

    kind: str
    name: str
    computation: str
    bytes: int
    executions: int
    group_size: int
    trip_count_known: bool = True
    op_name: str = ""
    wire_bytes: float = 0.0  # bytes each device sends per execution with a ring (bandwidth-optimal) algorithm

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.executions


def collectives(text: str) -> list[CollectiveOp]:
    """Every collective of a compiled HLO module, with per-device bytes and execution counts."""
    module = parse_hlo(text)
    by_name = {inst.name: inst for inst in module.instructions()}
    devices = _device_count(text, by_name.values())
    found = find_collectives(module, {"devices": devices})
    out = []
    for c in found:
        if c.kind == "collective-permute":
            size = len(instruction_groups(by_name[c.name], devices))
        else:
            size = c.group_size
        # The report counts the message (what one device contributes); here, the result.
        result = c.buffer_bytes // c.group_size if c.kind == "reduce-scatter" else c.buffer_bytes
        out.append(
            CollectiveOp(
                c.kind,
                c.name,
                c.computation,
                result,
                c.count,
                size,
                c.computation not in module.uncertain,
                c.op_name,
                c.wire_bytes,
            )
        )
    return out


def _device_count(text: str, instructions: Iterable) -> int:
    """``num_partitions`` from the module header, or (hand-written text) one more than the largest device id."""
    if partitions := _PARTITIONS.search(text):
        return int(partitions.group(1))
    ids = [
        device
        for inst in instructions
        if "replica_groups=" in inst.attrs or "source_target_pairs=" in inst.attrs
        for group in instruction_groups(inst, 1)
        for device in group
    ]
    return max(ids, default=0) + 1


def summarize(found: Iterable[CollectiveOp]) -> dict[str, dict[str, float]]:
    """Totals per kind: ``count`` (instructions in the text), ``executions``,
    ``bytes`` (result bytes x executions) and ``wire_bytes`` (ring estimate x executions)."""
    out: dict[str, dict[str, float]] = {}
    for c in found:
        row = out.setdefault(c.kind, {"count": 0, "executions": 0, "bytes": 0, "wire_bytes": 0.0})
        row["count"] += 1
        row["executions"] += c.executions
        row["bytes"] += c.total_bytes
        row["wire_bytes"] += c.wire_bytes * c.executions
    return out


def compiled_text(fn, *args, **kwargs) -> str:
    """Compiled (partitioned) HLO text of ``fn`` on these arguments; ``fn`` is jitted if it is not already."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*args, **kwargs).compile().as_text()
