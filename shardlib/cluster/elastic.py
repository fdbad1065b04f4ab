"""Elastic runs: the mesh and the gradient accumulation of a run that lost (or got back) processes.

An elastic run names its full size in its mesh file: ``across_hosts`` says how many processes
(hosts) it has when none is missing. Started with fewer, or more, it keeps everything inside a
host and every axis across hosts but one: the outer part of data parallelism, ``data_replica``
when it crosses hosts, else ``data``, takes the processes there are (:func:`derive_elastic_mesh`).
The global batch stays ``batch_size``: ``grad_accum`` grows by the factor the data-parallel size
shrank (:func:`elastic_grad_accum`), so every step sees the batch an uninterrupted run would, in
as many sequences per device and microbatch. :func:`resize_for_processes` applies both to a
config; ``train.py --elastic`` (which ``python -m shardlib.cluster.launch --elastic`` sets for
each process) calls it with the run's process count before it builds the mesh, and the newest
complete checkpoint then restores onto the derived mesh as onto any other.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

from shardlib.core.mesh import MeshSpec, format_sizes
from shardlib.training.config import Config

ENV_ELASTIC = "SHARDLIB_ELASTIC"
"""Set to 1 by the elastic launcher for every process: ``train.py`` then behaves as with ``--elastic``."""

_DATA_AXES = ("data_replica", "data")


def elastic_requested(flag: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this ``train.py`` is elastic: ``--elastic`` (``flag``) or ``SHARDLIB_ELASTIC=1``."""
    return flag or environ.get(ENV_ELASTIC) == "1"


def elastic_axis(spec: MeshSpec) -> str:
    """The axis that takes the processes of an elastic run: ``data_replica`` if it crosses hosts, else ``data``."""
    return "data_replica" if spec.across_hosts["data_replica"] > 1 else "data"


def data_parallel_size(spec: MeshSpec) -> int:
    """``data_replica x data``, inside and across hosts: the ways the batch is split (no -1 left)."""
    return math.prod(spec.within_host[a] * spec.across_hosts[a] for a in _DATA_AXES)


def derive_elastic_mesh(spec: MeshSpec, processes: int) -> MeshSpec:
    """``spec`` for a run of ``processes`` processes (one a host): ``elastic_axis`` across hosts becomes
    ``processes`` over the product of the other axes across hosts; ``within_host`` and every other axis stay.

    ``spec``: a mesh file of the run at full size, every ``across_hosts`` size stated (no -1).
    Returns ``spec`` itself for its own process count. Raises ValueError naming the mesh when no
    axis can take the change (neither ``data`` nor ``data_replica`` crosses hosts) or the other
    axes across hosts do not divide ``processes``.
    """
    where = f"mesh {spec.name!r}"
    across = spec.across_hosts
    if processes < 1:
        raise ValueError(f"{where}: an elastic run needs at least 1 process, got {processes}")
    if absorbing := [a for a, size in across.items() if size == -1]:
        raise ValueError(
            f"{where}: an elastic run needs every across_hosts size stated (its full size), but "
            f"{absorbing[0]} is -1; write the number of hosts the run has when none is missing"
        )
    axis = elastic_axis(spec)
    others = math.prod(size for a, size in across.items() if a != axis)
    if processes == others * across[axis]:
        return spec
    if across[axis] == 1:
        raise ValueError(
            f"{where} cannot change from {others} to {processes} processes: neither data nor data_replica "
            f"crosses hosts (across_hosts {format_sizes(across)}), so no axis can take the difference; put "
            f"data (or data_replica) across hosts, e.g. across_hosts: {{data: {others}}}"
        )
    if processes % others:
        fixed = format_sizes({a: s for a, s in across.items() if a != axis and s > 1})
        raise ValueError(
            f"{where} cannot run on {processes} processes: the axes across hosts that stay ({fixed}) need "
            f"a multiple of {others} processes, and only {axis} may change"
        )
    resized = {**across, axis: processes // others}
    note = f"{axis} across hosts {across[axis]} -> {resized[axis]} for {processes} processes (elastic)"
    description = f"{spec.description}; {note}" if spec.description else note
    return dataclasses.replace(spec, across_hosts=resized, description=description)


def elastic_grad_accum(grad_accum: int, full: MeshSpec, derived: MeshSpec) -> int:
    """The ``grad_accum`` on ``derived`` that keeps the global batch and the microbatch per device of
    ``grad_accum`` on ``full``: scaled by full over derived data-parallel size (``data_parallel_size``).

    Raises ValueError naming the sizes, and a ``grad_accum`` that would divide, when it is not an integer.
    """
    before, after = data_parallel_size(full), data_parallel_size(derived)
    sequences = grad_accum * before  # per device and microbatch: batch_size / sequences, on either mesh
    if sequences % after:
        would = after // math.gcd(before, after)
        raise ValueError(
            f"grad_accum={grad_accum} on data-parallel size {before} (mesh {full.name!r}) cannot keep the global "
            f"batch on data-parallel size {after}: grad_accum would have to be {grad_accum} x {before} / {after}, "
            f"not an integer; choose a grad_accum that is a multiple of {would} (then it scales to "
            f"{math.lcm(grad_accum, would) * before // after})"
        )
    return sequences // after


def resize_for_processes(cfg: Config, spec: MeshSpec, processes: int) -> tuple[Config, MeshSpec, str | None]:
    """(config, mesh spec, what changed in one line or None) of ``cfg`` on ``spec`` for ``processes``
    processes: the derived mesh (``derive_elastic_mesh``) and the scaled ``grad_accum``
    (``elastic_grad_accum``). Raises ValueError for what cannot resize (DiLoCo, pipelines, sizes
    that do not divide), naming it."""
    derived = derive_elastic_mesh(spec, processes)
    if derived is spec:
        return cfg, spec, None
    if cfg.outer.algorithm != "none":
        raise ValueError(
            f"an elastic restart on {processes} processes would change outer.replica_axes' replica count "
            f"({cfg.outer.algorithm} keeps one copy of the parameters per replica in its checkpoints); "
            "elastic DiLoCo is not supported yet: restart on the full mesh"
        )
    if derived.within_host["pipe"] * derived.across_hosts["pipe"] > 1:
        raise ValueError(
            "an elastic restart of a pipelined run (pipe > 1) is not supported yet: its batch is split by "
            "pipeline.microbatches, not grad_accum; restart on the full mesh"
        )
    grad_accum = elastic_grad_accum(cfg.grad_accum, spec, derived)
    axis = elastic_axis(spec)
    line = (
        f"elastic: {processes} processes, {axis} across hosts {spec.across_hosts[axis]} -> "
        f"{derived.across_hosts[axis]}, grad_accum {cfg.grad_accum} -> {grad_accum} "
        f"(global batch {cfg.batch_size} unchanged)"
    )
    return cfg.model_copy(update={"grad_accum": grad_accum}), derived, line
