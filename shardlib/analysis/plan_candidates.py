"""What the planner tries: meshes over N devices, the presets worth pairing with each, and pipelines.

A candidate is (axis sizes, preset, config): the config is the user's at each ``grad_accum``
dividing its own, or for a mesh with ``pipe > 1`` one copy per pipeline schedule the planner
weighs, with its microbatch count (``config_variants``). Everything here is axis sizes and configs, no devices, so a 64-GPU
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
# A pipeline is planned with these schedules. GPipe is left out: 1F1B has its bubble with at most
# p microbatches in flight instead of m, so it is never worse in the model.
PIPELINE_SCHEDULES = (("1f1b", 1), ("zb-h1", 1), ("zb-v", 2), ("interleaved-1f1b", 2))
# Microbatches per step tried, as multiples of p, largest first: the bubble shrinks with m and the
# 1F1B memory does not grow, so the largest that divides the batch wins; 4p keeps the bubble
# small without splitting microbatches so thin that the matmuls (which the time model treats as
# equally efficient at any size) stop filling the device.
MICROBATCHES_PER_STAGE = (4, 2, 1)


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
    with it, one per schedule.

    A pipelined variant accumulates through the pipeline's microbatches (``grad_accum`` 1, as
    the executor requires) and takes the most microbatches of ``MICROBATCHES_PER_STAGE`` x p
    whose rows still split over the batch axes; a schedule whose chunks do not divide the
    layers is left out.
    """
    p = sizes["pipe"]
    if p == 1:
        return accumulation_variants(cfg)
    rows_split = math.prod(sizes[a] for a in PRESETS["dp"].batch)
    out = []
    for schedule, virtual in PIPELINE_SCHEDULES:
        if cfg.model.n_layers % (p * virtual):
            continue
        fits = [k * p for k in MICROBATCHES_PER_STAGE if cfg.batch_size % (k * p * rows_split) == 0]
        if not fits:
            continue
        update = {"schedule": schedule, "virtual_stages": virtual, "microbatches": fits[0]}
        if schedule in SPLIT_BACKWARD:
            update["recompute"] = True  # their B recomputes the forward, whatever the config says
        pipeline = cfg.pipeline.model_copy(update=update)
        out.append(cfg.model_copy(update={"pipeline": pipeline, "grad_accum": 1}))
    return out or [cfg]  # nothing divides: the plain config, which resolve_layout drops with the reason


def accumulation_variants(cfg: Config) -> list[Config]:
    """``cfg`` at every ``grad_accum`` dividing its own, its own first: the same batch and loss in
    fewer, larger microbatches, which a mesh with more data shards may need to divide at all
    (the planner keeps the fastest that fits)."""
    g = cfg.grad_accum
    return [cfg.model_copy(update={"grad_accum": k}) for k in range(g, 0, -1) if g % k == 0]


def variant_label(cfg: Config, sizes: dict[str, int]) -> str:
    """`` (1f1b m=16)`` for a pipelined plan, `` (grad_accum 2)`` otherwise (the variant it runs)."""
    if sizes["pipe"] == 1:
        return f" (grad_accum {cfg.grad_accum})"
    p = cfg.pipeline
    virtual = f" v={p.virtual_stages}" if p.virtual_stages > 1 and p.schedule != "zb-v" else ""
    return f" ({p.schedule} m={p.microbatches}{virtual})"
