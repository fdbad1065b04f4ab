"""A minimal reader of compiled HLO text: which collectives run, how often, and how many bytes.

``collectives(text)`` lists every collective instruction of a compiled module
(``jax.jit(f).lower(*args).compile().as_text()``: the partitioned, per-device
program) with its result bytes per device and how many times it executes: an
instruction inside a ``while`` body runs ``known_trip_count`` times (nested
loops multiply), which a plain count of the text misses. ``summarize`` totals
them by kind. ``all-to-all`` results are tuples of arrays; their bytes are summed.

Scope: enough to check ring collectives and compressed all-reduces against
their bandwidth-optimal volumes. A loop without a known trip count counts once
and is flagged (``trip_count_known=False``). Async pairs (``*-start`` /
``*-done``, GPU) are counted at the start: ``all-reduce-start`` returns its
results, ``collective-permute-start`` and ``all-gather-start`` return
(operands, results, ...) and the results are taken (checked on CPU text and
hand-written GPU-style text only). ``shardlib.report`` builds the full
communication report.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

import jax

KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "ragged-all-to-all",
    "collective-broadcast",
)

_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16}
_BITS |= {"s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}

_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[(?P<dims>[0-9,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _dtype_bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    if dtype.startswith(("f8", "s8", "u8")):
        return 8
    if dtype.startswith("f4"):
        return 4
    raise ValueError(f"unknown HLO element type {dtype!r}")


def shape_bytes(shape: str) -> list[int]:
    """Bytes of every array in an HLO shape string (``f32[4,8]{1,0}`` or a tuple of them)."""
    out = []
    for m in _ARRAY.finditer(shape):
        if m["dtype"] in ("token",):
            continue
        dims = [int(d) for d in m["dims"].split(",") if d]
        out.append(math.prod(dims) * _dtype_bits(m["dtype"]) // 8)
    return out


def _top_level(shape: str) -> list[str]:
    """The elements of a tuple shape ``(a, (b, c), d)``; a non-tuple shape is its own single element."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 1:
            parts.append(shape[start:i])
            start = i + 1
    parts.append(shape[start : shape.rindex(")")])
    return [p.strip() for p in parts if p.strip()]


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled module.

    bytes: result bytes per device for one execution (summed over a tuple).
    executions: how many times it runs per call of the module (product of the
      trip counts of the loops around it).
    group_size: devices per replica group (None when the text does not say);
      for collective-permute, the number of source-target pairs.
    op_name: JAX's name for it (``metadata={op_name=...}``): the jit and
      ``jax.named_scope`` path, so callers can attribute collectives to code.
    """

    kind: str
    name: str
    computation: str
    bytes: int
    executions: int
    group_size: int | None
    trip_count_known: bool = True
    op_name: str = ""

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.executions

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per execution under a ring algorithm (collective-permute: its payload)."""
        n = self.group_size or 1
        if self.kind == "collective-permute":
            return float(self.bytes)
        if self.kind in ("all-gather", "all-to-all", "ragged-all-to-all", "collective-broadcast"):
            return self.bytes * (n - 1) / n
        if self.kind == "reduce-scatter":
            return float(self.bytes * (n - 1))
        if self.kind == "all-reduce":
            return 2 * self.bytes * (n - 1) / n
        raise ValueError(self.kind)


def _parse_computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry = None
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m["name"], [])
                if line.lstrip().startswith("ENTRY"):
                    entry = m["name"]
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    return comps, entry


def _group_size(kind: str, rest: str) -> int | None:
    if kind == "collective-permute":
        m = _PAIRS.search(rest)
        return m[1].count("{") if m else None
    if m := _GROUPS_LIST.search(rest):
        return len([d for d in m[1].split(",") if d])
    if m := _GROUPS_IOTA.search(rest):
        return int(m[2])
    if m := _GROUPS_MESH.search(rest):  # mesh['axis_0'=8,'axis_1'=1] {'axis_0'}: the braced axes
        sizes = {k.strip("' "): int(v) for k, v in (item.split("=") for item in m[1].split(","))}
        return math.prod(sizes[a.strip("' ")] for a in m[2].split(",") if a.strip())
    return None


def _executions(entry: str, edges: dict[str, list[tuple[str, int, bool]]]) -> tuple[dict[str, int], dict[str, bool]]:
    """Executions of every computation reachable from the entry, in topological order of the call DAG."""
    reachable, stack = {entry}, [entry]
    while stack:
        for callee, _, _ in edges.get(stack.pop(), ()):
            if callee in edges and callee not in reachable:
                reachable.add(callee)
                stack.append(callee)
    callers = dict.fromkeys(reachable, 0)
    for name in reachable:
        for callee, _, _ in edges[name]:
            if callee in callers:
                callers[callee] += 1
    runs, known = dict.fromkeys(reachable, 0), dict.fromkeys(reachable, True)
    runs[entry] = 1
    ready = [entry]
    while ready:
        name = ready.pop()
        for callee, mult, mult_known in edges[name]:
            if callee not in callers:
                continue
            runs[callee] += runs[name] * mult
            known[callee] = known[callee] and known[name] and mult_known
            callers[callee] -= 1
            if callers[callee] == 0:
                ready.append(callee)
    return runs, known


def collectives(text: str) -> list[Collective]:
    """Every collective of a compiled HLO module, with per-device bytes and execution counts."""
    comps, entry = _parse_computations(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    # Call graph: (caller, callee, multiplier, known).
    edges: dict[str, list[tuple[str, int, bool]]] = {name: [] for name in comps}
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            rest = m["rest"]
            trip = _TRIP.search(rest) if m["op"] == "while" else None
            for role, callee in _CALLEE.findall(rest):
                if m["op"] == "while" and role == "body":
                    edges[name].append((callee, int(trip[1]) if trip else 1, trip is not None))
                elif role != "condition":
                    edges[name].append((callee, 1, True))
            for group in _BRANCHES.findall(rest):
                for callee in group.split(","):
                    edges[name].append((callee.strip().lstrip("%"), 1, True))
    runs, known = _executions(entry, edges)
    found = []
    for name, lines in comps.items():
        if name not in runs:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m["op"]
            kind = op.removesuffix("-start")
            if kind not in KINDS or op.endswith("-done"):
                continue
            shape = m["shape"]
            if op in ("collective-permute-start", "all-gather-start"):
                parts = _top_level(shape)
                shape = parts[1] if len(parts) > 1 else shape
            sizes = shape_bytes(shape)
            op_name = _OP_NAME.search(m["rest"])
            found.append(
                Collective(
                    kind,
                    m["name"],
                    name,
                    sum(sizes),
                    runs[name],
                    _group_size(kind, m["rest"]),
                    known[name],
                    op_name[1] if op_name else "",
                )
            )
    return found


def summarize(found: Iterable[Collective]) -> dict[str, dict[str, float]]:
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
