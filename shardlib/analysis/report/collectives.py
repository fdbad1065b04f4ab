"""Every collective of a compiled program: kind, mesh axes, bytes per device, runs per step.

Bytes are counted two ways, both per device:

* ``buffer_bytes``: the message, i.e. the data one device contributes
  (all-reduce, all-to-all, collective-permute, reduce-scatter input) or
  receives whole (all-gather output); what the message-size histogram shows;
* ``wire_bytes``: what a bandwidth-optimal (ring) algorithm sends per device:
  all-reduce 2(n-1)/n of the buffer, all-gather and reduce-scatter (n-1)/n of
  the full (gathered / unscattered) buffer, all-to-all (n-1)/n, a permute its
  whole buffer times the share of devices that send (a permute over some pairs
  only, as a pipeline tick's: the mean over the devices). These are the units
  of the analytic model (``analytic.py``).

Asynchronous pairs (``all-gather-start`` / ``-done`` on GPU) count once, at
the start; collectives wrapped in ``async-start`` computations are found in
the wrapped computation. Sizes come from the operands, so the ``-start`` tuple
shapes (operand, result, contexts) never confuse the count.

An all-reduce whose every result is only sliced (``dynamic-slice`` / ``slice``,
possibly inside a fusion) to 1/n of it is what XLA:CPU emits for sharded
gradients instead of a reduce-scatter: it moves 2(n-1)/n instead of (n-1)/n of
the buffer. Such ops are marked ``sliced`` and their excess is quantified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from shardlib.analysis.report.groups import describe_axes, group_axes, group_size, instruction_groups
from shardlib.analysis.report.hlo import HloModule, Instruction, arrays_in, dtype_bytes, shape_bytes
from shardlib.analysis.report.patterns import narrowed_itemsize, sliced_bytes, summed_bytes

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")
_OPCODES = {kind: kind for kind in KINDS} | {kind + "-start": kind for kind in KINDS}
_OPCODES["ragged-all-to-all"] = "all-to-all"


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program."""

    name: str
    kind: str
    axes: tuple[str, ...]
    exact_axes: bool
    group_size: int
    buffer_bytes: int
    wire_bytes: float
    count: int
    dtype: str
    computation: str
    op_name: str
    sliced: bool = False
    sliced_bytes: int = 0
    summed_bytes: int = 0
    summed_terms: int = 0
    narrowed_to: int = 0  # bytes per element the result is converted down to, when that is all it is used as
    pairs: frozenset[tuple[int, int]] = frozenset()  # collective-permute: (source, target) device positions

    def per_axis(self, sizes: Mapping[str, int]) -> dict[str, float]:
        """Wire bytes per step attributed to each mesh axis (``split_by_axis``), scaled to this op's total."""
        shares = split_by_axis(self.kind, self.buffer_bytes, self.axes, sizes)
        total = sum(shares.values())
        if not total:
            return {}
        scale = self.total_wire_bytes / total  # partial groups: keep the op's own total
        return {a: b * scale for a, b in shares.items()}

    @property
    def axes_label(self) -> str:
        return describe_axes(self.axes, self.exact_axes)

    @property
    def total_wire_bytes(self) -> float:
        return self.wire_bytes * self.count

    @property
    def excess_wire_bytes(self) -> float:
        """Per run, the bytes a better program would not move.

        An all-reduce-then-slice moves (n-1)/n of the sliced buffer beyond the
        reduce-scatter that would do its job; k addends reduced separately move
        (k-1)/k of their all-reduce beyond reducing their sum; a result that is
        only converted down to a narrower type (bf16 activations reduced in f32
        by XLA:CPU, which computes bf16 dots in f32) could have moved in it.
        """
        n = self.group_size
        if n < 2:
            return 0.0
        buffer = float(self.buffer_bytes)
        if self.summed_terms:
            buffer -= self.summed_bytes * (self.summed_terms - 1) / self.summed_terms
        better = wire_bytes(self.kind, buffer, n) - (n - 1) / n * self.sliced_bytes
        if self.narrowed_to:
            better *= self.narrowed_to / max(dtype_bytes(self.dtype), 1)
        return max(self.wire_bytes - better, 0.0)

    @property
    def inefficiency(self) -> str:
        """A one-line name for what is avoidable about this op ('' when nothing is)."""
        notes = []
        if self.sliced:
            notes.append("all-reduce whose result is only sliced (a reduce-scatter would do)")
        if self.summed_terms:
            notes.append(f"all-reduce of {self.summed_terms} addends summed afterwards (reduce their sum once)")
        if self.narrowed_to:
            notes.append(
                f"{self.dtype} result only converted to {self.narrowed_to}-byte floats (reduce in the narrow type)"
            )
        return "; ".join(notes)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["axes"] = list(self.axes)
        out["total_wire_bytes"] = self.total_wire_bytes
        out["excess_wire_bytes"] = self.excess_wire_bytes * self.count
        out["inefficiency"] = self.inefficiency
        return out


def wire_bytes(kind: str, buffer_bytes: int, n: int) -> float:
    """Bytes one device sends with a bandwidth-optimal algorithm (see the module docstring)."""
    if n < 2:
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * buffer_bytes
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        return (n - 1) / n * buffer_bytes
    return float(buffer_bytes)  # collective-permute, collective-broadcast


def split_by_axis(kind: str, buffer_bytes: float, axes: tuple[str, ...], sizes: Mapping[str, int]) -> dict[str, float]:
    """Per-mesh-axis share of one op's wire bytes, as a hierarchical algorithm would move them.

    Over several axes a bandwidth-optimal all-reduce reduce-scatters over the
    innermost axis (the fastest links: ``model`` is innermost), recurses on the
    1/n piece over the next axis, and gathers back: the innermost axis moves
    2(n-1)/n of the buffer, the next 2(n'-1)/n' of 1/n of it, and so on; the
    shares add up to the flat 2(N-1)/N. All-gather, reduce-scatter and
    all-to-all split the same way with (n-1)/n; a permute splits evenly. The
    measured and the predicted side both use this, so per-axis ratios compare
    like with like.
    """
    axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
    if not axes:
        return {}
    if kind == "collective-permute":
        return {a: buffer_bytes / len(axes) for a in axes}
    factor = 2.0 if kind == "all-reduce" else 1.0
    out, piece = {}, float(buffer_bytes)
    for axis in reversed(axes):  # innermost first
        n = sizes[axis]
        out[axis] = factor * (n - 1) / n * piece
        piece /= n
    return out


def _operand_bytes(module: HloModule, inst: Instruction) -> int:
    total = sum(shape_bytes(module.operand_shape(inst, i)) for i in range(len(inst.operands)))
    return total or inst.bytes


def _buffer_bytes(module: HloModule, inst: Instruction, kind: str, n: int) -> int:
    operand = _operand_bytes(module, inst)
    return operand * n if kind == "all-gather" else operand  # all-gather: the gathered result


def _dtype(module: HloModule, inst: Instruction) -> str:
    shapes = [module.operand_shape(inst, i) for i in range(len(inst.operands))] or [inst.shape]
    arrays = [a for s in shapes for a in arrays_in(s)] or arrays_in(inst.shape)
    return arrays[0][0] if arrays else "?"


def _op_name(inst: Instruction) -> str:
    marker = 'op_name="'
    start = inst.attrs.find(marker)
    if start < 0:
        return ""
    end = inst.attrs.find('"', start + len(marker))
    return inst.attrs[start + len(marker) : end]


def find_collectives(module: HloModule, mesh_shape: Mapping[str, int]) -> list[Collective]:
    """Every collective in ``module`` with its per-step count (trip counts applied).

    ``mesh_shape``: the mesh's axis sizes in order, e.g. ``{"data": 4, ..., "model": 2}``.
    """
    mult = module.multiplicities()
    num_devices = 1
    for size in mesh_shape.values():
        num_devices *= size
    out = []
    for inst in module.instructions():
        kind = _OPCODES.get(inst.opcode)
        count = mult.get(inst.computation, 0)
        if kind is None or not count:
            continue
        groups = instruction_groups(inst, num_devices)
        is_pairs = kind == "collective-permute"
        axes, exact = group_axes(groups, mesh_shape, pairs=is_pairs)
        n = 2 if is_pairs and axes else group_size(groups)
        buffer = _buffer_bytes(module, inst, kind, n)
        reduce = kind == "all-reduce" and n > 1
        sliced = sliced_bytes(module, inst, n) if reduce else 0
        summed, terms = summed_bytes(module, inst) if reduce else (0, 0)
        # Gathered parameters cast at use are the model's own choice (it predicts gathers in the
        # parameter dtype); reduced activations in a wider type than they are used in are not.
        narrow = narrowed_itemsize(module, inst) if kind in ("all-reduce", "reduce-scatter") and n > 1 else 0
        out.append(
            Collective(
                name=inst.name,
                kind=kind,
                axes=axes,
                exact_axes=exact,
                group_size=n,
                buffer_bytes=buffer,
                wire_bytes=wire_bytes(kind, buffer, n) * (len(groups) / num_devices if is_pairs else 1),
                count=count,
                dtype=_dtype(module, inst),
                computation=inst.computation,
                op_name=_op_name(inst),
                sliced=sliced > 0,
                sliced_bytes=sliced,
                summed_bytes=summed,
                summed_terms=terms,
                narrowed_to=narrow,
                pairs=frozenset(tuple(pair) for pair in groups) if is_pairs else frozenset(),
            )
        )
    return out


def dot_flops(module: HloModule) -> float:
    """FLOPs of every ``dot`` in the program, times how often it runs: 2 x output x contracted size.

    A cross-check on ``cost_analysis()``, which may count a loop body once.
    """
    mult = module.multiplicities()
    total = 0.0
    for inst in module.instructions():
        count = mult.get(inst.computation, 0)
        if inst.opcode != "dot" or not count:
            continue
        out = arrays_in(inst.shape)
        lhs = arrays_in(module.operand_shape(inst, 0))
        dims = inst.attr("lhs_contracting_dims")
        if not out or not lhs or dims is None:
            continue
        contracted = 1
        for d in (int(x) for x in dims.strip("{}").split(",") if x.strip()):
            contracted *= lhs[0][1][d]
        elements = 1
        for d in out[0][1]:
            elements *= d
        total += 2.0 * elements * contracted * count
    return total


__all__ = ["KINDS", "Collective", "dot_flops", "dtype_bytes", "find_collectives", "wire_bytes"]
