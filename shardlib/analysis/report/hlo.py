"""A small reader for compiled HLO text: computations, instructions, shapes and loop trip counts.

``compiled.as_text()`` is the one stable view of what XLA will run after SPMD
partitioning (the StableHLO before compilation has no collectives in auto
mode). This module turns it into :class:`HloModule`: computations with their
instructions (name, result shape, opcode, operand names, attribute text), a
symbol table for operand shapes, and how many times each computation runs per
call of the entry computation (:meth:`HloModule.multiplicities`), following
``while`` bodies times their ``known_trip_count``, nested loops included, and
every other computation-calling attribute (fusions, calls, async wrappers,
conditional branches) once per call.

The parser is deliberately tolerant: the text format changes between XLA
versions (operand shapes printed or not, ``%`` sigils, replica-group syntax),
so anything it does not recognise is skipped rather than fatal.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterator

# Bytes per element of HLO primitive types; sub-byte types round up per element.
DTYPE_BYTES = {
    "pred": 1,
    "s2": 1,
    "u2": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
# f8e4m3fn, f8e5m2, f4e2m1fn, ...: one byte each (rounded up for f4).
_FLOAT8 = re.compile(r"^f[468]e\d+m\d+\w*$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_ASSIGN = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(branch_computations|calls)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
# The async halves that repeat the wrapped computation of their ``-start``; following them would count it twice.
_NO_FOLLOW = frozenset({"async-update", "async-done"})


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of an HLO element type (``f32`` -> 4); unknown types count 4."""
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    if _FLOAT8.match(dtype):
        return 1
    return 4


def arrays_in(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every ``dtype[dims]`` array in a (possibly tuple) shape string, e.g. ``[("f32", (8, 4))]``.

    Dynamic dimensions (``<=8``) count at their bound; layouts (``{1,0}``) are ignored.
    """
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        sizes = tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append((dtype, sizes))
    return out


def shape_bytes(shape: str) -> int:
    """Total bytes of all arrays in a shape string (a tuple sums its elements)."""
    return sum(dtype_bytes(dtype) * math.prod(dims) for dtype, dims in arrays_in(shape))


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = shape opcode(operands), attrs``."""

    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    computation: str
    is_root: bool = False

    @property
    def bytes(self) -> int:
        return shape_bytes(self.shape)

    @property
    def elements(self) -> int:
        """Elements of a plain array result (of all arrays, for a tuple)."""
        return sum(math.prod(dims) for _, dims in arrays_in(self.shape))

    def callees(self) -> list[str]:
        """Computations this instruction calls (fusion bodies, loop bodies, branches, wrapped async ops)."""
        if self.opcode in _NO_FOLLOW:
            return []
        names = [m.group(2) for m in _CALLEE.finditer(self.attrs)]
        for match in _CALLEE_LIST.finditer(self.attrs):
            names += [n.strip().lstrip("%") for n in match.group(2).split(",") if n.strip()]
        return names

    def trip_count(self) -> int | None:
        """``known_trip_count`` of a ``while`` (None when XLA did not record one)."""
        match = _TRIP_COUNT.search(self.attrs)
        return int(match.group(1)) if match else None

    def attr(self, key: str) -> str | None:
        """The raw text of attribute ``key=...`` up to the next top-level comma, or None."""
        return top_level_attr(self.attrs, key)


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: list[Instruction]
    symbols: dict[str, Instruction]

    def users(self) -> dict[str, list[Instruction]]:
        """Operand name -> instructions of this computation that use it."""
        out: dict[str, list[Instruction]] = defaultdict(list)
        for inst in self.instructions:
            for op in inst.operands:
                out[op].append(inst)
        return out


@dataclasses.dataclass
class HloModule:
    computations: dict[str, Computation]
    entry: str
    unknown_trip_counts: int = 0
    # Computations whose multiplicity rests on a loop without a known trip count.
    uncertain: frozenset[str] = frozenset()

    def instructions(self) -> Iterator[Instruction]:
        for comp in self.computations.values():
            yield from comp.instructions

    def operand_shape(self, inst: Instruction, index: int) -> str:
        """Shape of operand ``index`` of ``inst`` (looked up by name in its computation)."""
        comp = self.computations[inst.computation]
        name = inst.operands[index]
        found = comp.symbols.get(name)
        return found.shape if found is not None else ""

    def multiplicities(self) -> dict[str, int]:
        """How many times each computation runs per execution of the entry computation.

        A ``while`` multiplies its body and condition by ``known_trip_count``
        (the condition really runs once more; it holds no collectives, so this
        is ignored). A loop without a known trip count counts once and is
        tallied in ``unknown_trip_counts``. Conditional branches count as if
        each were taken: an upper bound.
        """
        order = _topological(self)
        mult: dict[str, int] = defaultdict(int)
        mult[self.entry] = 1
        self.unknown_trip_counts = 0
        uncertain: set[str] = set()
        for name in order:
            count = mult.get(name, 0)
            if not count:
                continue
            for inst in self.computations[name].instructions:
                trips, unknown = 1, name in uncertain
                if inst.opcode == "while":
                    trips = inst.trip_count()
                    if trips is None:
                        trips, unknown = 1, True
                        self.unknown_trip_counts += 1
                for callee in inst.callees():
                    if callee in self.computations:
                        mult[callee] += count * trips
                        if unknown:
                            uncertain.add(callee)
        self.uncertain = frozenset(uncertain)
        return dict(mult)


def _topological(module: HloModule) -> list[str]:
    """Computations ordered callers before callees, starting at the entry."""
    seen: set[str] = set()
    post: list[str] = []

    def visit(name: str) -> None:
        stack = [(name, iter(_callees_of(module, name)))]
        seen.add(name)
        while stack:
            current, children = stack[-1]
            for child in children:
                if child not in seen and child in module.computations:
                    seen.add(child)
                    stack.append((child, iter(_callees_of(module, child))))
                    break
            else:
                stack.pop()
                post.append(current)

    visit(module.entry)
    return post[::-1]


def _callees_of(module: HloModule, name: str) -> list[str]:
    return [c for inst in module.computations[name].instructions for c in inst.callees()]


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]`` ('(' or '{' or '[')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    closing = {v: k for k, v in pairs.items()}
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch in pairs:
            depth += 1
        elif ch in closing:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside any brackets (and outside ``/* ... */`` comments)."""
    parts, depth, current, i = [], 0, [], 0
    while i < len(text):
        if text.startswith("/*", i):
            end = text.find("*/", i)
            i = len(text) if end < 0 else end + 2
            continue
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if current:
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def top_level_attr(attrs: str, key: str) -> str | None:
    """Value text of ``key=`` among comma-separated attributes (brackets respected)."""
    for part in split_top_level(attrs):
        if part.startswith(key + "="):
            return part[len(key) + 1 :]
    return None


def _parse_instruction(line: str, computation: str) -> Instruction | None:
    match = _ASSIGN.match(line)
    if not match:
        return None
    name = match.group(2)
    pos = match.end()
    if pos < len(line) and line[pos] == "(":  # tuple shape
        end = _balanced(line, pos)
    else:
        end = line.find(" ", pos)
        if end < 0:
            return None
    shape = line[pos:end]
    rest = line[end:].lstrip()
    op_match = re.match(r"([\w\-]+)\(", rest)
    if not op_match:
        return None
    opcode = op_match.group(1)
    close = _balanced(rest, op_match.end() - 1)
    operand_text = rest[op_match.end() : close - 1]
    operands = []
    for part in split_top_level(operand_text):
        token = part.split()[-1] if part.split() else part
        operands.append(token.lstrip("%"))
    attrs = rest[close:].lstrip(", ").strip()
    return Instruction(name, shape, opcode, tuple(operands), attrs, computation, bool(match.group(1)))


def parse_hlo(text: str) -> HloModule:
    """Parses ``compiled.as_text()`` into an :class:`HloModule`."""
    computations: dict[str, Computation] = {}
    entry = None
    current: Computation | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("//"):
            continue
        if current is None:
            if line.startswith(("HloModule", " ")):
                continue
            header = _HEADER.match(line)
            if header:
                current = Computation(header.group(2), bool(header.group(1)), [], {})
                if current.is_entry:
                    entry = current.name
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current = None
            continue
        inst = _parse_instruction(line, current.name)
        if inst is not None:
            current.instructions.append(inst)
            current.symbols[inst.name] = inst
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return HloModule(computations, entry)
