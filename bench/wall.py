"""Wall time of an SPMD step on CPU, one device per core: the method behind ``bench/pipeline.py --wall``.

p emulated CPU devices in one process share XLA's intra-op thread pool, so a
stage with nothing to do lends its core to a busy one and a step's wall time
is the work of all stages over the cores, not its critical path. Here each
device is a process of its own, pinned to one core before JAX starts
(``os.sched_setaffinity``: its thread pools then have one core to run on,
whatever their size), joined by ``jax.distributed`` with gloo collectives
over loopback. A stage's idle tick is then idle time of its core, and the
step's wall time is the critical path through the schedule.

The pieces:
    ``launch``: runs one command once per core, the workers joined through
        ``shardlib.cluster.launch.child_env``; process 0's output is the run's.
    ``pin_and_join``: a worker's first call, before any device use.
    ``alternating_times``: every side one step per round, the processes
        started together by a barrier before each step, so every side sees the
        same machine; a step's time is its slowest process's.
    ``Spread``: median and spread of a side's repeats.
    ``HostLoad``: the CPU other processes used while the bench ran (the
        measurement holds only while that stays near zero).
    ``ideal_time``: work per stage plus the fill, the control's yardstick.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ENV_CORES = "SHARDLIB_BENCH_CORES"  # the cores the workers pin themselves to, in process order


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask), in order."""
    return sorted(os.sched_getaffinity(0))


def launch(command: Sequence[str], processes: int, cores: Sequence[int] | None = None) -> int:
    """Runs ``command`` (argv, run with this Python) as ``processes`` workers, worker i pinned to
    ``cores[i]`` (default: the first ``processes`` cores of this process's affinity).

    Raises ValueError when fewer cores than processes are available: two workers on one core
    share it, and their step's wall time is no longer a critical path. Returns the first
    non-zero exit status (0 when all succeed); every worker but process 0 prints only on failure.
    """
    from shardlib.cluster.launch import child_env, free_port

    cores = list(cores if cores is not None else available_cores()[:processes])
    if len(cores) < processes or len(set(cores)) < processes:
        raise ValueError(
            f"--wall with {processes} stages needs {processes} distinct cores, one per stage; this process may "
            f"use {available_cores()} (a p-stage wall time needs p cores: run with fewer --stages or on a larger machine)"
        )
    coordinator = f"127.0.0.1:{free_port()}"
    children = []
    for index in range(processes):
        env = child_env(dict(os.environ), coordinator, processes, index)
        env[ENV_CORES] = ",".join(map(str, cores))
        quiet = subprocess.PIPE if index else None
        children.append(subprocess.Popen([sys.executable, *command], env=env, stdout=quiet, stderr=quiet))
    status = 0
    for index, child in enumerate(children):
        out, err = child.communicate()
        if child.returncode and not status:
            status = child.returncode
            if index:
                sys.stderr.write(
                    f"worker {index} failed ({child.returncode}):\n{(out or b'').decode()}{(err or b'').decode()}"
                )
    return status


def pin_and_join() -> int:
    """In a worker started by ``launch``: pins this process to its core, joins the run; returns its index.

    Must run before JAX touches a device. The intra-op pool is then confined to one core,
    as is every thread XLA starts later (threads inherit the mask).
    """
    import jax

    from shardlib.cluster.join import join_settings

    settings = join_settings()
    if not settings:
        raise RuntimeError("pin_and_join runs in a worker of bench.wall.launch (no JAX_PROCESS_ID in the environment)")
    index = settings["process_id"]
    cores = [int(c) for c in os.environ[ENV_CORES].split(",")]
    os.sched_setaffinity(0, {cores[index]})
    jax.distributed.initialize(**settings)
    return index


@dataclasses.dataclass(frozen=True)
class Spread:
    """A side's repeats: median, and the spread as (max - min) / median and the interquartile range / median."""

    median: float
    range_rel: float
    iqr_rel: float
    repeats: int

    @classmethod
    def of(cls, times: Sequence[float]) -> Spread:
        if not times:
            raise ValueError("Spread.of needs at least one time")
        median = statistics.median(times)
        if len(times) > 1:
            q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        else:
            q1 = q3 = median
        return cls(median, (max(times) - min(times)) / median, (q3 - q1) / median, len(times))


def alternating_times(
    sides: dict[str, Callable[[], object]],
    repeats: int,
    barrier: Callable[[], None],
    gather: Callable[[list[float]], list[list[float]]],
    only_here: Sequence[str] = (),
) -> dict[str, list[float]]:
    """Seconds per step of every side: ``repeats`` rounds, each running every side once, in order.

    sides: name -> a call that runs one step and blocks until its outputs are ready (it must
        already be compiled: the first call is not timed differently).
    barrier: starts the processes together (every process calls it before each step).
    gather: one list of floats per process, from this process's list (an all-gather).
    only_here: sides that run on this process alone (a one-device control): the others skip
        them, and their time is this process's.
    Returns name -> per-round times, each the slowest process's.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, step in sides.items():
            barrier()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    names = list(sides)
    flat = [t for name in names for t in times[name]]
    everywhere = gather(flat)
    out = {}
    for i, name in enumerate(names):
        rows = [proc[i * repeats : (i + 1) * repeats] for proc in everywhere]
        out[name] = rows[0] if name in only_here else [max(column) for column in zip(*rows, strict=True)]
    return out


def ideal_time(per_stage_work: float, fill: float) -> float:
    """The physical limit of a synchronous step: each stage's own work plus the fill (the time
    the last stage waits for its first input and the first stage for its last gradient)."""
    return per_stage_work + fill


def gpipe_ideal(sequential: float, stages: int, microbatches: int) -> float:
    """A p-stage GPipe's ideal from the same work run on one device (``sequential``): each stage
    does 1/p of it, and the fill is p - 1 microbatches' forward and backward on one stage,
    (p - 1) / m of a stage's work."""
    per_stage = sequential / stages
    return ideal_time(per_stage, per_stage * (stages - 1) / microbatches)


class HostLoad:
    """CPU time the whole machine spent busy, less this run's own processes', over a wall interval.

    ``start()`` then ``stop(own_cpu_s)`` -> cores' worth of other work while it ran (0: the
    machine was ours; 1: another job held a core the whole time). Reads /proc/stat.
    """

    def start(self) -> None:
        self._busy, self._wall = _busy_seconds(), time.perf_counter()

    def stop(self, own_cpu_s: float) -> float:
        wall = time.perf_counter() - self._wall
        return max(0.0, (_busy_seconds() - self._busy - own_cpu_s) / wall)


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
