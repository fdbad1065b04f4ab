"""Recognising avoidable collectives in compiled HLO by how their results are used.

Three patterns, all seen on XLA:CPU (whose pipeline lacks the GPU's
ReduceScatterCreator and AllReduceReassociate passes):

* sliced: an all-reduce whose every result is only ever ``dynamic-slice``d
  to 1/n of itself: FSDP gradients, which a reduce-scatter would deliver
  directly at half the bytes;
* summed: a tuple all-reduce whose same-shaped results are only added to
  each other afterwards (the input gradients of separate column-parallel
  weights in tensor parallelism, as q, k, v and gate, up were before
  ``shardlib.models.layers`` fused them): reducing their sum moves 1/k of the bytes;
* narrowed: a result used only through a conversion to a narrower type (bf16
  activations reduced in f32 because XLA:CPU computes bf16 dots in f32).

Uses are followed through size-keeping ops (bitcast, copy, reshape, transpose,
convert, get-tuple-element) and into fusions; reaching a fusion's root
continues with the fusion's users outside.
"""

from __future__ import annotations

from collections.abc import Callable

from shardlib.analysis.report.hlo import Computation, HloModule, Instruction, arrays_in, dtype_bytes

PASS_THROUGH = frozenset({"bitcast", "copy", "reshape", "transpose", "convert", "get-tuple-element"})
SLICES = frozenset({"dynamic-slice", "slice"})
_MAX_DEPTH = 12

# terminal(user, value name) -> a value when ``user`` ends the path as wanted, else None.
Terminal = Callable[[Instruction, str], "int | None"]


def _fused(module: HloModule, fusion: Instruction) -> Computation | None:
    callees = fusion.callees()
    return module.computations.get(callees[0]) if callees else None


def _parameter(comp: Computation, index: int) -> Instruction | None:
    return next((i for i in comp.instructions if i.opcode == "parameter" and i.operands == (str(index),)), None)


def trace_uses(
    module: HloModule, comp: Computation, name: str, full: int, terminal: Terminal, outer: tuple = (), depth: int = 0
) -> list[int] | None:
    """Terminal values of every use path of value ``name`` (``full`` elements), or None if one path is not terminal."""
    if depth > _MAX_DEPTH:
        return None
    node = comp.symbols.get(name)
    if node is not None and node.is_root and outer:
        parent, fusion = outer[-1]
        return trace_uses(module, parent, fusion.name, full, terminal, outer[:-1], depth + 1)
    users = [u for u in comp.instructions if name in u.operands]
    if not users:
        return None
    found: list[int] = []
    for user in users:
        value = terminal(user, name)
        if value is not None:
            found.append(value)
            continue
        if user.opcode in PASS_THROUGH and user.elements == full:
            inner = trace_uses(module, comp, user.name, full, terminal, outer, depth + 1)
        elif user.opcode == "fusion" and (fused := _fused(module, user)) is not None:
            inner = []
            for index, operand in enumerate(user.operands):
                param = _parameter(fused, index) if operand == name else None
                if operand != name:
                    continue
                more = (
                    None
                    if param is None
                    else trace_uses(module, fused, param.name, full, terminal, (*outer, (comp, user)), depth + 1)
                )
                if more is None:
                    return None
                inner += more
        else:
            return None
        if inner is None:
            return None
        found += inner
    return found


def _results(module: HloModule, inst: Instruction) -> list[Instruction]:
    """The instruction itself, or its get-tuple-elements for a tuple result."""
    comp = module.computations[inst.computation]
    if inst.shape.startswith("("):
        return [u for u in comp.instructions if u.opcode == "get-tuple-element" and u.operands == (inst.name,)]
    return [inst]


def sliced_bytes(module: HloModule, inst: Instruction, n: int) -> int:
    """Bytes of the results that are only ever sliced to at most 1/n of themselves."""
    comp = module.computations[inst.computation]

    def slice_end(user: Instruction, name: str) -> int | None:
        return user.elements if user.opcode in SLICES and user.operands[0] == name else None

    total = 0
    for part in _results(module, inst):
        kept = trace_uses(module, comp, part.name, part.elements, slice_end)
        if kept and max(kept) * n <= part.elements * 1.01:
            total += part.bytes
    return total


def narrowed_itemsize(module: HloModule, inst: Instruction) -> int:
    """Bytes per element every result is converted down to, if that is all they are used for; else 0."""
    comp = module.computations[inst.computation]
    parts = _results(module, inst)
    sizes = []
    for part in parts:
        arrays = arrays_in(part.shape)
        if not arrays:
            return 0
        wide = dtype_bytes(arrays[0][0])

        def narrowing(user: Instruction, name: str, wide=wide) -> int | None:
            if user.opcode != "convert":
                return None
            out = arrays_in(user.shape)
            return dtype_bytes(out[0][0]) if out and dtype_bytes(out[0][0]) < wide else None

        found = trace_uses(module, comp, part.name, part.elements, narrowing)
        if not found:
            return 0
        sizes.append(max(found))
    return max(sizes) if sizes else 0


def _only_summed(comp: Computation, names: list[str]) -> bool:
    """True when the values ``names`` are used only by ``add``s that sum them together (through size-keeping ops)."""
    members = set(names)
    adds: set[str] = set()
    for inst in comp.instructions:  # instructions are in definition order, so one pass closes the set
        if inst.opcode in PASS_THROUGH and inst.operands and inst.operands[0] in members | adds:
            members.add(inst.name)
        elif inst.opcode == "add" and set(inst.operands) <= members | adds:
            adds.add(inst.name)
    if not adds:
        return False
    return all(not (set(i.operands) & members) or i.name in adds | members for i in comp.instructions)


def _summed_everywhere(module: HloModule, comp: Computation, names: list[str]) -> bool:
    consumers = [u for u in comp.instructions if set(u.operands) & set(names)]
    if not consumers:
        return False
    if any(u.opcode != "fusion" for u in consumers) and not _only_summed(comp, names):
        return False
    for user in consumers:
        if user.opcode != "fusion":
            continue
        fused = _fused(module, user)
        if fused is None or set(names) - set(user.operands):
            return False
        params = [
            p.name for p in fused.instructions if p.opcode == "parameter" and user.operands[int(p.operands[0])] in names
        ]
        if not _only_summed(fused, params):
            return False
    return True


def summed_bytes(module: HloModule, inst: Instruction) -> tuple[int, int]:
    """(bytes, k) of k same-shaped results of a tuple all-reduce only added together afterwards; (0, 0) if none."""
    if not inst.shape.startswith("("):
        return 0, 0
    comp = module.computations[inst.computation]
    by_shape: dict[str, list[Instruction]] = {}
    for part in _results(module, inst):
        by_shape.setdefault(part.shape.split("{")[0], []).append(part)
    for group in by_shape.values():
        if len(group) >= 2 and _summed_everywhere(module, comp, [p.name for p in group]):
            return sum(p.bytes for p in group), len(group)
    return 0, 0
