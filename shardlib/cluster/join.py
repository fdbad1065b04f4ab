"""Joining a multi-process run through ``jax.distributed``; shardlib adds no cluster layer of its own.

A process joins when any of these holds, checked in this order:

1. flags or environment variables name the run: ``--coordinator`` / ``JAX_COORDINATOR_ADDRESS``
   (host:port of process 0), ``--num-processes`` / ``JAX_NUM_PROCESSES``, ``--process-id`` /
   ``JAX_PROCESS_ID``; whatever is left out is detected by ``jax.distributed``;
2. ``--distributed``: ``jax.distributed`` detects everything (SLURM, Open MPI, Kubernetes
   with the ``kubernetes`` package, Cloud TPU);
3. inside a SLURM job step of several tasks (``srun``, ``SLURM_STEP_NUM_TASKS > 1``). A
   batch script itself is not a step, so ``python train.py`` in an sbatch script with
   ``--ntasks 2`` stays a single process instead of waiting for a partner that never comes.
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Mapping

import jax

from shardlib.cluster.supervise import divert_runtime_output, is_supervised, log_path, supervise
from shardlib.cluster.watchdog import runtime_timeout
from shardlib.training.faults import resume_advice

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def join_settings(
    *,
    distributed: bool = False,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict | None:
    """Keyword arguments for ``jax.distributed.initialize``, or None for a single-process run.

    Flags win over environment variables. Raises ValueError naming the bad value.
    """
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(environ, ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(environ, ENV_PROCESS_ID)
    named = {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    named = {key: value for key, value in named.items() if value is not None}
    if coordinator is not None and not coordinator.rpartition(":")[2].isdigit():
        raise ValueError(f"coordinator address {coordinator!r} must be host:port, e.g. 10.0.0.1:1234")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"the number of processes must be at least 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"the process id must be at least 0, got {process_id}")
    if process_id is not None and num_processes is not None and process_id >= num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1} for {num_processes} processes")
    if named or distributed:
        return named
    if (_env_int(environ, "SLURM_STEP_NUM_TASKS") or 1) > 1:
        return {}
    return None


def join(settings: dict, peer_timeout_s: float, *, run_dir: str | pathlib.Path | None = None) -> None:
    """Calls ``jax.distributed.initialize`` (before any device use) with timeouts from ``peer_timeout_s``.

    The runtime's heartbeat and shutdown timeouts are twice the peer timeout: the
    watchdog (``shardlib.cluster.watchdog``) reports a lost peer first and by name.
    With ``run_dir``, this process is supervised first (``shardlib.cluster.supervise``): the
    runtime's own output goes to ``run_dir/logs/process-I.log``, not the terminal, and its abort
    for a lost peer becomes one line naming the checkpoint in ``run_dir/checkpoints`` to resume from.
    """
    if run_dir is not None:
        if not is_supervised():
            logs = pathlib.Path(run_dir) / "logs"
            supervise(log_path(logs, settings), functools.partial(resume_advice, pathlib.Path(run_dir) / "checkpoints"))
        divert_runtime_output()
    timeout = runtime_timeout(peer_timeout_s)
    try:
        jax.distributed.initialize(**settings, heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)
    except ValueError as err:  # jax's words for "no cluster detected and not enough given"
        raise ValueError(
            f"cannot join a multi-process run: {err} No cluster (SLURM, Open MPI, Kubernetes, TPU) was "
            f"detected; give --coordinator host:port --num-processes N --process-id I, or set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}"
        ) from err
