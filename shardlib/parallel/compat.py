"""Which parallel features compose, as one table you can print and test.

A run's features (``RunFeatures``: preset, pipeline, schedule, sequence
sharding with its attention, experts, compression, accumulation, remat,
bfloat16 compute, processes) are read from the config and mesh once, by the
plan builder (``shardlib.training.parallel_plan``). Every pair of features has exactly
one cell in ``MATRIX``: it composes, it is refused (with the one-line reason
the error gives), or the two exclude each other by definition (two presets).
``check`` raises the table's error for the first refused pair a run holds;
no other module decides on its own that two features do not combine.

A few composing cells are refused only under a condition on the run
(``REFUSED_WHEN``: DiLoCo with FSDP when the replica axes leave FSDP nothing
to shard over); ``check`` raises those too, with their own reason.

A new feature is a new row of ``FEATURES`` and one cell per existing feature:
``tests/test_compat.py`` fails while any pair is missing, and runs every
composing pair against a single-device reference (``diloco``'s cells, whose
runs are compared with the DiLoCo algorithm instead, are covered by
``tests/test_diloco.py``: see ``DILOCO_TESTS``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Literal

from shardlib.core.rules import PRESETS as PRESET_INTENTS

Status = Literal["composes", "refused", "exclusive"]


@dataclasses.dataclass(frozen=True)
class RunFeatures:
    """What a run asks of the mesh, in the terms the table speaks.

    Sizes are mesh axis sizes; ``attention`` is ``attention.impl``;
    ``experts`` the model's expert count (0 = dense).
    """

    preset: str
    data_replica: int = 1
    pipe: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    seq: int = 1
    attention: str = "dense"
    expert: int = 1
    experts: int = 0
    moe_dispatch: str = "capacity"  # model.moe.dispatch: capacity or dropless
    compression: str = "none"
    grad_accum: int = 1
    remat: str = "none"
    compute_dtype: str = "float32"
    processes: int = 1
    outer: str = "none"  # outer.algorithm: none, diloco or local_sgd
    replica_axes: tuple[str, ...] = ("data",)


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    meaning: str
    active: Callable[[RunFeatures], bool]


FEATURES: tuple[Feature, ...] = (
    Feature("dp", "preset dp: parameters replicated", lambda f: f.preset == "dp"),
    Feature(
        "fsdp",
        "preset fsdp (or hsdp): parameters sharded over data (ZeRO-3)",
        lambda f: bool(PRESET_INTENTS[f.preset].fsdp) and not PRESET_INTENTS[f.preset].tensor,
    ),
    Feature("tp", "preset tp: Megatron tensor parallelism over model", lambda f: f.preset == "tp"),
    Feature(
        "fsdp_tp",
        "preset fsdp_tp (or hsdp_tp): both",
        lambda f: bool(PRESET_INTENTS[f.preset].fsdp and PRESET_INTENTS[f.preset].tensor),
    ),
    Feature(
        "hsdp",
        "data_replica > 1: the batch spans data's replica groups, each holding a copy of the parameters "
        "(with FSDP: sharded inside a group, hybrid sharded data parallelism)",
        lambda f: f.data_replica > 1,
    ),
    Feature("pipeline", "pipe > 1, gpipe or 1f1b", lambda f: f.pipe > 1 and f.schedule in ("gpipe", "1f1b")),
    Feature(
        "interleaved",
        "pipe > 1, interleaved-1f1b with virtual_stages > 1",
        lambda f: f.pipe > 1 and f.schedule == "interleaved-1f1b",
    ),
    Feature(
        "zero-bubble",
        "pipe > 1, zb-h1: backwards split into input and weight gradients",
        lambda f: f.pipe > 1 and f.schedule == "zb-h1",
    ),
    Feature(
        "zero-bubble-v",
        "pipe > 1, zb-v: two chunks per stage in a V, backwards split",
        lambda f: f.pipe > 1 and f.schedule == "zb-v",
    ),
    Feature("seq", "seq > 1: every sequence split over the seq axis", lambda f: f.seq > 1),
    Feature("ring", "attention.impl=ring (K/V blocks rotate over seq)", lambda f: f.attention == "ring"),
    Feature("allgather", "attention.impl=allgather (K/V all-gathered over seq)", lambda f: f.attention == "allgather"),
    Feature(
        "ulysses",
        "attention.impl=ulysses (all-to-alls over seq trade the sequence split for a head split; with "
        "ulysses_degree < seq, the ring across the groups)",
        lambda f: f.attention == "ulysses",
    ),
    Feature("fused", "attention.impl=fused (jax.nn.dot_product_attention)", lambda f: f.attention == "fused"),
    Feature(
        "moe",
        "mixture of experts, capacity dispatch (model.moe.n_experts > 0)",
        lambda f: f.experts > 0 and f.moe_dispatch != "dropless",
    ),
    Feature(
        "dropless",
        "mixture of experts, model.moe.dispatch=dropless: every (token, choice) pair reaches its expert "
        "(grouped matmul)",
        lambda f: f.experts > 0 and f.moe_dispatch == "dropless",
    ),
    Feature("compression", "grad_compression bf16 or int8", lambda f: f.compression != "none"),
    Feature("accumulation", "grad_accum > 1", lambda f: f.grad_accum > 1),
    Feature("remat", "remat full, save_matmuls or save_matmuls_attention", lambda f: f.remat != "none"),
    Feature("bf16", "compute_dtype bfloat16", lambda f: f.compute_dtype == "bfloat16"),
    Feature("multiprocess", "more than one process (jax.distributed)", lambda f: f.processes > 1),
    Feature(
        "diloco",
        "outer.algorithm diloco or local_sgd: replica groups over outer.replica_axes",
        lambda f: f.outer != "none",
    ),
)
NAMES = tuple(f.name for f in FEATURES)
PRESETS = ("dp", "fsdp", "tp", "fsdp_tp")


@dataclasses.dataclass(frozen=True)
class Cell:
    status: Status
    why: str = ""


_PIPE = "the pipeline's microbatches accumulate gradients; set grad_accum=1 and raise pipeline.microbatches"
_COMPRESS_VMAP = "compressed gradients take per-shard gradients under vmap over the data shards"
_DILOCO_VMAP = "DiLoCo runs each replica's step under vmap over the replica axes"
_DILOCO_PIPE = (
    "the pipeline's shard_map is manual over the batch axes, which DiLoCo's per-replica vmap over the replica "
    "axes cannot enter; use pipe=1 with outer.algorithm"
)
# What no pipeline kind (PIPELINE_KINDS) runs with: feature -> the reason.
_NOT_IN_PIPELINES = {
    "compression": "compressed gradients are not implemented with pipeline parallelism (pipe > 1)",
    "accumulation": _PIPE,
    "diloco": _DILOCO_PIPE,
}
PIPELINE_KINDS = ("pipeline", "interleaved", "zero-bubble", "zero-bubble-v")
_MOE_LAYER_ORDER = (
    "two or more chunks per stage store the layer stack in pipeline order (layer_order), which does not yet "
    "reorder an MoE model's own stacks (its MoE layers' router and experts, and the dense layers' MLPs, fewer "
    "than n_layers); use pipeline.virtual_stages=1 (gpipe, 1f1b or zb-h1)"
)
# Refusals: (feature, feature) -> the reason, which is the error's text.
REFUSED: dict[tuple[str, str], str] = {
    **{(kind, other): why for kind in PIPELINE_KINDS for other, why in _NOT_IN_PIPELINES.items()},
    ("interleaved", "moe"): _MOE_LAYER_ORDER,
    ("zero-bubble-v", "moe"): _MOE_LAYER_ORDER,
    ("interleaved", "dropless"): _MOE_LAYER_ORDER,
    ("zero-bubble-v", "dropless"): _MOE_LAYER_ORDER,
    ("fsdp", "compression"): "compressed gradients need parameters replicated over data; FSDP would need a "
    "compressed reduce-scatter (use dp or tp)",
    ("fsdp_tp", "compression"): "compressed gradients need parameters replicated over data; FSDP would need a "
    "compressed reduce-scatter (use dp or tp)",
    ("ring", "compression"): f"{_COMPRESS_VMAP}, which the ring's shard_map does not support",
    ("allgather", "compression"): f"{_COMPRESS_VMAP}, which the all-gather attention's shard_map does not support",
    ("moe", "compression"): f"{_COMPRESS_VMAP}, which the expert all-to-all does not support",
    ("ulysses", "compression"): f"{_COMPRESS_VMAP}, which the Ulysses attention's shard_map does not support",
    ("ulysses", "diloco"): f"{_DILOCO_VMAP}, which the Ulysses attention's shard_map does not support",
    ("dropless", "compression"): f"{_COMPRESS_VMAP}, which the dropless experts' shard_map does not support",
    ("seq", "fused"): "fused attention needs the whole sequence on each device; with seq > 1 use ring",
    ("ring", "diloco"): f"{_DILOCO_VMAP}, which the ring's shard_map does not support",
    ("allgather", "diloco"): f"{_DILOCO_VMAP}, which the all-gather attention's shard_map does not support",
    ("moe", "diloco"): f"{_DILOCO_VMAP}, which the expert all-to-all does not support",
    ("dropless", "diloco"): f"{_DILOCO_VMAP}, which the dropless experts' shard_map does not support",
    ("compression", "diloco"): "DiLoCo's inner steps reduce no gradient over the replica axes; compress its "
    "pseudo-gradient with outer.compression instead of grad_compression",
}
_FSDP_INSIDE = (
    "under DiLoCo, FSDP shards parameters over its axes (data) that are not replica axes, and "
    "outer.replica_axes leaves none; use tp, or outer.replica_axes=[expert] to keep data for FSDP inside "
    "each replica"
)


def _fsdp_axes_all_replicas(f: RunFeatures) -> bool:
    """FSDP inside a replica would shard over nothing: every FSDP axis of the preset is a replica axis."""
    return set(PRESET_INTENTS[f.preset].fsdp) <= set(f.replica_axes)


# Composing cells refused on a condition of the run: (feature, feature) -> (condition, reason).
REFUSED_WHEN: dict[tuple[str, str], tuple[Callable[[RunFeatures], bool], str]] = {
    ("fsdp", "diloco"): (_fsdp_axes_all_replicas, _FSDP_INSIDE),
    ("fsdp_tp", "diloco"): (_fsdp_axes_all_replicas, _FSDP_INSIDE),
}
# The composing diloco cells and the test that runs each (tests/test_diloco.py); multiprocess, as in
# tests/test_compat.py: an SPMD program does not change with the number of processes holding its devices.
DILOCO_TESTS: dict[str, str] = {
    "dp": "test_four_replicas_match_the_papers_algorithm",
    "fsdp": "test_h1_local_sgd_is_data_parallelism",
    "tp": "test_inside_replicas_match_the_papers_algorithm[tp+seq+accumulation+remat]",
    "fsdp_tp": "test_inside_replicas_match_the_papers_algorithm[fsdp_tp+fused]",
    "seq": "test_inside_replicas_match_the_papers_algorithm[tp+seq+accumulation+remat]",
    "fused": "test_inside_replicas_match_the_papers_algorithm[fsdp_tp+fused]",
    "accumulation": "test_inside_replicas_match_the_papers_algorithm[tp+seq+accumulation+remat]",
    "remat": "test_inside_replicas_match_the_papers_algorithm[tp+seq+accumulation+remat]",
    "bf16": "test_bfloat16_compute_inside_replicas",
    "multiprocess": "tests/test_multiprocess.py::test_diloco_across_two_processes_matches_one_and_resumes_mid_period",
    "hsdp": "test_inside_replicas_match_the_papers_algorithm[hsdp]",
}
# Pairs that compose, with what a user should know about the result.
NOTES: dict[tuple[str, str], str] = {
    ("moe", "accumulation"): "the load-balancing and z-losses are batch statistics: each microbatch takes its own, "
    "as a run of batch_size / grad_accum would, so the objective is not the whole batch's",
    ("dropless", "accumulation"): "the load-balancing and z-losses are taken per microbatch, as with the capacity "
    "dispatch (moe x accumulation)",
    ("pipeline", "dropless"): "the load-balancing and z-losses are taken per microbatch; the dropless transport "
    "(all-gather on XLA:CPU, ragged_all_to_all on GPU and TPU) runs inside each stage",
    ("zero-bubble", "dropless"): "as zero-bubble x moe: the MoE layers' router and expert gradients are computed in "
    "B, only the dense weight uses' are deferred to W",
    ("pipeline", "moe"): "the load-balancing and z-losses are taken per microbatch (pipeline.microbatches), as "
    "with grad_accum; the expert all-to-alls run inside each stage",
    ("zero-bubble", "moe"): "the load-balancing and z-losses are taken per microbatch (pipeline.microbatches); the "
    "MoE layers' router and expert gradients are computed in B (their weights are probed, not their uses), so "
    "only the dense weight uses' gradients are deferred to W",
    **{
        (kind, "seq"): "seq is manual inside the stages: each stage runs on its own block of every sequence; "
        "dense attention runs there as the all-gather kernel (K and V gathered over seq)"
        for kind in PIPELINE_KINDS
    },
    ("dp", "diloco"): "each replica is data parallel over the batch axes that are not replica axes (if any)",
    ("fsdp", "diloco"): "FSDP inside each replica, over the preset's FSDP axes (data) that are not replica axes",
    ("fsdp_tp", "diloco"): "FSDP over data inside each replica (data not a replica axis), TP over model",
    ("accumulation", "diloco"): "every replica accumulates its own rows' microbatches",
    ("tp", "ulysses"): "the all-to-alls split each device's heads (n_heads / model) over the Ulysses degree, "
    "which must divide them",
    ("fsdp_tp", "ulysses"): "the all-to-alls split each device's heads (n_heads / model) over the Ulysses degree, "
    "which must divide them",
}
# Features that cannot both hold by definition: one preset per run, one attention per run,
# one pipeline kind per run, one expert dispatch per run.
_EXCLUSIVE_GROUPS = (PRESETS, ("ring", "allgather", "ulysses", "fused"), PIPELINE_KINDS, ("moe", "dropless"))


def _key(a: str, b: str) -> frozenset[str]:
    return frozenset((a, b))


def _build_matrix() -> dict[frozenset[str], Cell]:
    matrix = {_key(a, b): Cell("composes") for a, b in itertools.combinations(NAMES, 2)}
    for group in _EXCLUSIVE_GROUPS:
        for a, b in itertools.combinations(group, 2):
            matrix[_key(a, b)] = Cell("exclusive", "one of them per run")
    for (a, b), why in REFUSED.items():
        matrix[_key(a, b)] = Cell("refused", why)
    return matrix


MATRIX: dict[frozenset[str], Cell] = _build_matrix()


def cell(a: str, b: str) -> Cell:
    """The table's cell for two features (in either order)."""
    if a == b or a not in NAMES or b not in NAMES:
        raise KeyError(f"no cell for ({a!r}, {b!r}); features: {', '.join(NAMES)}")
    return MATRIX[_key(a, b)]


def active(features: RunFeatures) -> tuple[str, ...]:
    """The table's features a run holds, in table order."""
    return tuple(f.name for f in FEATURES if f.active(features))


class IncompatibleFeatures(ValueError):
    """Two features of a run do not compose; the message is the table's reason."""


def check(features: RunFeatures, describe: Callable[[str], str] | None = None) -> None:
    """Raises ``IncompatibleFeatures`` for the first refused pair the run holds.

    ``describe(name)`` turns a feature into the user's terms (the config
    setting that turned it on); by default the feature's meaning.
    """
    names = active(features)
    meaning = {f.name: f.meaning for f in FEATURES}
    describe = describe or meaning.__getitem__
    for a, b in itertools.combinations(names, 2):
        if (c := cell(a, b)).status == "refused":
            raise IncompatibleFeatures(f"{describe(a)} does not combine with {describe(b)}: {c.why}")
        condition, why = REFUSED_WHEN.get((a, b)) or REFUSED_WHEN.get((b, a)) or (None, "")
        if condition is not None and condition(features):
            raise IncompatibleFeatures(f"{describe(a)} does not combine with {describe(b)}: {why}")


def composing_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a, b in itertools.combinations(NAMES, 2) if cell(a, b).status == "composes"]


def format_matrix(names: Iterable[str] = NAMES) -> str:
    """The table as text: ``+`` composes, ``x`` refused, ``.`` exclusive; then the reasons."""
    names = tuple(names)
    width = max(map(len, names))
    symbols = {"composes": "+", "refused": "x", "exclusive": "."}
    header = " " * (width + 2) + " ".join(f"{i:>2}" for i in range(len(names)))
    lines = ["feature compatibility (+ composes, x refused, . one per run)", header]
    for i, a in enumerate(names):
        row = ["--" if a == b else f"{symbols[cell(a, b).status]:>2}" for b in names]
        lines.append(f"{a:<{width}} {i:>2} " + " ".join(row))
    lines += ["", "features:"]
    lines += [f"  {i:>2} {f.name:<{width}}  {f.meaning}" for i, f in enumerate(FEATURES) if f.name in names]
    lines += ["", "refused:"]
    lines += [f"  {a} x {b}: {why}" for (a, b), why in REFUSED.items()]
    lines += ["", "composes, with a note:"]
    lines += [f"  {a} x {b}: {why}" for (a, b), why in NOTES.items()]
    lines += ["", "composes, but refused when:"]
    lines += [f"  {a} x {b}: {why}" for (a, b), (_, why) in REFUSED_WHEN.items()]
    return "\n".join(lines)
