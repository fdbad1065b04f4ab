"""What the planner tries: meshes over N devices, the presets worth pairing with each, and pipelines.

A candidate is (axis sizes, preset, config): the config is the user's at each ``grad_accum``
that divides the global batch over the mesh's batch axes, or for a mesh with ``pipe > 1`` one
copy per pipeline schedule (GPipe, 1F1B, ZB-H1, ZB-V, interleaved 1F1B at every chunk count
dividing the layers per stage) with the most microbatches the batch allows (``config_variants``), at
the config's ``pipeline.recompute`` (label ``kept`` where forwards keep their residuals). Everything here is axis sizes and configs, no devices, so a 64-GPU
mesh is planned on a laptop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shardlib.core.mesh import MESH_AXES
from shardlib.core.rules import PRESETS
from shardlib.parallel.pipeline.schedules import SPLIT_BACKWARD
from shardlib.training.config import Config

PLAN_AXES = ("data", "pipe", "seq", "model")
# A pipeline is planned with these schedules at v chunks per stage (None: every v > 1 dividing the
# layers per stage, the interleaved schedule's choice). GPipe holds every microbatch's stage input
# and 1F1B at most p, with the same bubble in lockstep: GPipe is weighed where its memory fits.
PIPELINE_SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("zb-v", 2), ("interleaved-1f1b", None))
MAX_GPIPE_VARIANTS = 3  # GPipe's memory grows with m: the largest m, and the next smaller ones


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in _factorizations(n // d, k - 1)]


def planned_axes(cfg: Config, axes: Sequence[str] = PLAN_AXES) -> tuple[str, ...]:
    """``axes``, plus ``expert`` for a model with MoE layers (for a dense one it would only repeat data)."""
    extra = ("expert",) if cfg.model.moe.n_experts and "expert" not in axes else ()
    return tuple(axes) + extra


def candidate_meshes(devices: int, axes: Sequence[str] = PLAN_AXES) -> list[dict[str, int]]:
    """Every product of the planned ``axes`` (some of data, pipe, expert, seq, model) equal to ``devices``; other axes 1."""
    out = []
    for sizes in _factorizations(devices, len(axes)):
        mesh = dict.fromkeys(MESH_AXES, 1)
        mesh.update(zip(axes, sizes, strict=True))
        out.append(mesh)
    return out


def hierarchical_mesh(sizes: dict[str, int], devices_per_host: int) -> dict[str, int]:
    """``sizes`` with ``data`` split for HSDP: the part inside a host stays ``data``, the rest is ``data_replica``.

    Hosts fill from the innermost axis (``model``) outwards, so ``data`` gets what a host has
    left after the axes inside it; on one host the split is trivial (``data_replica`` 1).
    """
    inside = math.prod(n for a, n in sizes.items() if MESH_AXES.index(a) > MESH_AXES.index("data"))
    in_host = math.gcd(sizes["data"], max(1, devices_per_host // inside))
    return {**sizes, "data_replica": sizes["data_replica"] * sizes["data"] // in_host, "data": in_host}


def redundant(sizes: dict[str, int], sharding: str) -> str:
    """Why a (mesh, preset) pair is not worth planning, or ''."""
    intent = PRESETS[sharding]
    if intent.tensor and sizes["model"] == 1:
        return "no model axis for tensor parallelism (same as the preset without it)"
    if not intent.tensor and sizes["model"] > 1:
        return "model axis unused by the preset: its devices would repeat work"
    if intent.fsdp and sizes["data"] == 1:
        return "no data axis to shard parameters over (same as the preset without FSDP)"
    if intent.hierarchical and sizes["data_replica"] == 1:
        return "data fits inside one host: HSDP would be FSDP"
    return ""


def config_variants(cfg: Config, sizes: dict[str, int]) -> list[Config]:
    """The configs to plan ``cfg`` with on ``sizes``: without ``pipe``, its ``accumulation_variants``;
    with it, one per schedule and chunk count.

    A pipelined variant accumulates through the pipeline's microbatches (``grad_accum`` 1, as
    the executor requires) and takes the most microbatches whose rows still split over the batch
    axes (m a multiple of p, at least one row per device each): in the model the bubble only
    shrinks with m, and 1F1B's memory does not grow. GPipe, whose memory does, is also tried at
    the next smaller counts. Interleaved 1F1B is tried at every v > 1 dividing the layers per
    stage; a schedule whose chunks do not divide the layers is left out.
    """
    p = sizes["pipe"]
    if p == 1:
        return accumulation_variants(cfg, sizes)
    rows_split = math.prod(sizes[a] for a in PRESETS["dp"].batch)
    counts = [
        m for m in range(cfg.batch_size // rows_split, 0, -1) if m % p == 0 and cfg.batch_size % (m * rows_split) == 0
    ]
    if not counts:
        return [cfg]  # nothing divides: the plain config, which resolve_layout drops with the reason
    out = []
    for schedule, virtual in PIPELINE_SCHEDULES:
        chunks = (
            [virtual]
            if virtual
            else [v for v in range(2, cfg.model.n_layers // p + 1) if cfg.model.n_layers % (p * v) == 0]
        )
        for v in chunks:
            if cfg.model.n_layers % (p * v):
                continue
            for m in counts[:MAX_GPIPE_VARIANTS] if schedule == "gpipe" else counts[:1]:
                out.append(_pipelined(cfg, schedule, v, m))
    return out or [cfg]


def _pipelined(cfg: Config, schedule: str, virtual: int, microbatches: int) -> Config:
    """``cfg`` pipelined so, at its own ``pipeline.recompute`` (keeping the residuals makes every
    table's units cost one forward, ``plan.schedule_for``), but an MoE model's split tables recompute
    (``plan_pipeline`` refuses them otherwise)."""
    update: dict = {"schedule": schedule, "virtual_stages": virtual, "microbatches": microbatches}
    if cfg.model.moe.n_experts and schedule in SPLIT_BACKWARD:
        update["recompute"] = True
    pipeline = cfg.pipeline.model_copy(update=update)
    return cfg.model_copy(update={"pipeline": pipeline, "grad_accum": 1})


def accumulation_variants(cfg: Config, sizes: dict[str, int] | None = None) -> list[Config]:
    """``cfg`` at every ``grad_accum`` dividing the global batch into microbatches whose rows split over
    the batch axes of ``sizes``, fewest microbatches first (its own among them): the same batch and
    loss in fewer, larger microbatches or more, smaller ones (the planner keeps the fastest that fits)."""
    rows_split = math.prod(sizes[a] for a in PRESETS["dp"].batch) if sizes else 1
    counts = [k for k in range(1, cfg.batch_size + 1) if cfg.batch_size % (k * rows_split) == 0]
    if cfg.grad_accum not in counts:
        counts.append(cfg.grad_accum)  # the user's own, whatever resolve_layout says of it
    return [cfg.model_copy(update={"grad_accum": k}) for k in counts]


SEQ_ATTENTION = ("ring", "allgather", "ulysses", "hybrid")
"""``--attention``'s choices on a mesh with ``seq > 1``: ``hybrid`` is Ulysses at every degree 1 < u < seq."""


def attention_variants(cfg: Config, sizes: dict[str, int], choices: Sequence[str] = ()) -> list[Config]:
    """``cfg`` with each attention over ``seq`` of ``choices`` (``SEQ_ATTENTION``) where ``seq > 1``, else
    ``[cfg]``; its own attention first. Ulysses is left out where the heads per device do not split over
    its degree (the kernel would refuse them); the analytic model weighs each by its terms and memory."""
    p = sizes["seq"]
    if p == 1 or not choices:
        return [cfg]
    unknown = sorted(set(choices) - set(SEQ_ATTENTION))
    if unknown:
        raise ValueError(f"unknown attention choice(s) {', '.join(unknown)}; known: {', '.join(SEQ_ATTENTION)}")
    heads = cfg.model.n_heads // math.gcd(cfg.model.n_heads, sizes["model"])
    settings: list[dict] = []
    for choice in choices:
        if choice in ("ring", "allgather"):
            settings.append({"impl": choice, "ulysses_degree": None, "ulysses_kernel": "dense"})
        degrees = [p] if choice == "ulysses" else [u for u in range(2, p) if p % u == 0] if choice == "hybrid" else []
        for u in degrees:
            if heads % u == 0:
                settings.append({"impl": "ulysses", "ulysses_degree": None if u == p else u})
    out = [cfg]
    for update in settings:
        variant = cfg.model_copy(update={"attention": cfg.attention.model_copy(update=update)})
        if variant.attention != cfg.attention:
            out.append(variant)
    return out


def attention_label(cfg: Config) -> str:
    """`` ulysses2`` (the hybrid's degree), `` ulysses``, `` ring``: the attention over ``seq`` in a label."""
    a = cfg.attention
    return f" {a.impl}{a.ulysses_degree or ''}"


def variant_label(cfg: Config, sizes: dict[str, int]) -> str:
    """`` (1f1b m=16)`` for a pipelined plan, `` (grad_accum 2)`` otherwise (the variant it runs)."""
    if sizes["pipe"] == 1:
        return f" (grad_accum {cfg.grad_accum})"
    p = cfg.pipeline
    virtual = f" v={p.virtual_stages}" if p.virtual_stages > 1 and p.schedule != "zb-v" else ""
    kept = "" if p.recompute else " kept"
    return f" ({p.schedule} m={p.microbatches}{virtual}{kept})"
