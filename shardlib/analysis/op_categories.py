"""What kind of work each op of a compiled step is: matmul, attention, collective, elementwise, copy.

A profile names what ran by HLO instruction (``hlo_op``, on CPU and GPU) or,
where XLA launched a library kernel or the annotation is missing, by kernel
name only. :func:`hlo_categories` reads the compiled module's text (the one
``compiled.as_text()`` gives, which ``bench/throughput.py --hlo`` writes) and
names every instruction's category by what it computes:

* a fusion by what it fuses: a dot or a matmul library call makes it a
  matmul, a collective a collective, nothing but data movement a copy;
* a custom call by its target: cuDNN's fused attention is ``attention``,
  cuBLAS ``matmul``; a kernel XLA does not know (Pallas, Triton) by the JAX
  code that emitted it (``metadata={op_name=...}``) when that names attention;
* loops, calls and conditionals as ``container``: their bodies' ops are
  timed themselves, so the profile drops these rather than count twice.

:func:`name_category` is the fallback for a kernel the module does not name,
from the naming conventions of cuBLAS, cuDNN, CUTLASS, NCCL and XLA's own
kernels. The categories and patterns are tables, so that they can be printed
and tested.
"""

from __future__ import annotations

import re

from shardlib.analysis.report.collectives import KINDS
from shardlib.analysis.report.hlo import HloModule, Instruction, parse_hlo

MATMUL, ATTENTION, COLLECTIVE, ELEMENTWISE, COPY = "matmul", "attention", "collective", "elementwise", "copy"
HOST_TRANSFER, OTHER, CONTAINER = "host_transfer", "other", "container"
# What a profile reports, in the order that decides an instant where several run at once (the
# first one active takes it): compute first, so "collective" is the communication left exposed.
CATEGORIES = (MATMUL, ATTENTION, ELEMENTWISE, COPY, OTHER, COLLECTIVE, HOST_TRANSFER)

# The report's collective kinds (their -start/-done halves too), and the point-to-point and ragged ones.
_COLLECTIVE_OPCODES = frozenset(KINDS) | {"ragged-all-to-all", "send", "recv"}
# Ops that only move or reinterpret bytes.
_MOVEMENT_OPCODES = frozenset(
    {
        "copy",
        "transpose",
        "bitcast",
        "bitcast-convert",
        "reshape",
        "broadcast",
        "slice",
        "dynamic-slice",
        "dynamic-update-slice",
        "concatenate",
        "pad",
        "reverse",
        "gather",
        "scatter",
        "copy-start",
        "copy-done",
    }
)
# Ops that hold no work of their own (inside a fusion they are neither compute nor movement).
_NEUTRAL_OPCODES = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "iota", "after-all"})
_CONTAINER_OPCODES = frozenset({"while", "call", "conditional"})
_MATMUL_OPCODES = frozenset({"dot", "convolution", "ragged-dot", "scaled-dot"})
# custom_call_target patterns, first match wins.
CUSTOM_CALL_TARGETS = (
    (re.compile(r"fmha|flash|attention", re.IGNORECASE), ATTENTION),
    (re.compile(r"cublas|gemm|matmul|onednn\$matmul", re.IGNORECASE), MATMUL),
)
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ATTENTION_SOURCE = re.compile(r"attention|flash|splash", re.IGNORECASE)
# Kernel names, first match wins: NCCL's, cuDNN's fused attention and flash kernels, cuBLAS(Lt),
# CUTLASS and XLA's Triton GEMMs (nvjet_*, sm90_xmma_*, cutlass*, *gemm*), copies, XLA's fusions.
KERNEL_NAME_PATTERNS = (
    (
        re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|sendrecv", re.IGNORECASE),
        COLLECTIVE,
    ),
    (re.compile(r"memcpy\s*(htod|dtoh|h2d|d2h)|htod|dtoh", re.IGNORECASE), HOST_TRANSFER),
    (re.compile(r"fmha|flash|sdpa|attention", re.IGNORECASE), ATTENTION),
    (re.compile(r"gemm|matmul|xmma|cutlass|nvjet|wgmma|cublas|\bdot\b|dot_", re.IGNORECASE), MATMUL),
    (re.compile(r"memcpy|memset|copy|transpose", re.IGNORECASE), COPY),
    (re.compile(r"fusion|reduce|elementwise|convert|loop_|input_|wrapped_", re.IGNORECASE), ELEMENTWISE),
)


def name_category(kernel: str) -> str:
    """A kernel's category from its name alone (``nvjet_hsh_256x128...`` -> matmul)."""
    for pattern, category in KERNEL_NAME_PATTERNS:
        if pattern.search(kernel):
            return category
    return OTHER


def hlo_categories(text: str) -> dict[str, str]:
    """Every instruction of a compiled module's text, by name, with its category."""
    module = parse_hlo(text)
    fused: dict[str, str] = {}
    out = {}
    for inst in module.instructions():
        out[inst.name] = _category(module, inst, fused)
    return out


def _category(module: HloModule, inst: Instruction, fused: dict[str, str]) -> str:
    if inst.opcode.removesuffix("-start").removesuffix("-done") in _COLLECTIVE_OPCODES:
        return COLLECTIVE
    if inst.opcode in _MATMUL_OPCODES:
        return MATMUL
    if inst.opcode in _CONTAINER_OPCODES:
        return CONTAINER
    if inst.opcode == "custom-call":
        return _custom_call_category(inst)
    if inst.opcode in ("fusion", "async-start", "async-update", "async-done"):
        return _called_category(module, inst, fused)
    if inst.opcode in _MOVEMENT_OPCODES:
        return COPY
    return ELEMENTWISE


def _custom_call_category(inst: Instruction) -> str:
    target = _TARGET.search(inst.attrs)
    for pattern, category in CUSTOM_CALL_TARGETS:
        if target and pattern.search(target.group(1)):
            return category
    source = _OP_NAME.search(inst.attrs)
    if source and _ATTENTION_SOURCE.search(source.group(1)):
        return ATTENTION
    return OTHER


def _called_category(module: HloModule, inst: Instruction, fused: dict[str, str]) -> str:
    """A fusion's (or an async wrapper's) category from the ops of the computations it calls."""
    kinds: set[str] = set()
    for callee in inst.callees():
        if callee not in module.computations:
            continue
        if callee not in fused:
            fused[callee] = _computation_category(module, callee, fused)
        kinds.add(fused[callee])
    return _heaviest(kinds) if kinds else ELEMENTWISE


def _computation_category(module: HloModule, name: str, fused: dict[str, str]) -> str:
    """The heaviest kind of op in a called computation (nothing but movement: a copy)."""
    inner = module.computations[name].instructions
    return _heaviest({_category(module, i, fused) for i in inner if i.opcode not in _NEUTRAL_OPCODES})


def _heaviest(kinds: set[str]) -> str:
    """What a group of ops is taken for: attention > matmul > collective > compute > other > movement."""
    return next((c for c in (ATTENTION, MATMUL, COLLECTIVE, ELEMENTWISE, OTHER) if c in kinds), COPY)
