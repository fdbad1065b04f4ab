"""The launcher's elastic mode: ``python -m shardlib.cluster.launch --elastic --min-processes K --processes N``.

The job runs as generations of :class:`~shardlib.cluster.launch.Launcher`, each a whole
``jax.distributed`` run of the processes available then, numbered from 0, with a coordinator of
its own. Every process gets ``SHARDLIB_ELASTIC=1``, so ``train.py`` derives its mesh and
``grad_accum`` for the count (``shardlib.cluster.elastic``) and resumes from the newest complete
checkpoint. A generation ends in one of four ways:

* every process succeeded: the run is done (status 0);
* processes were lost (ended by a signal: SIGKILL, an OOM kill, a crash): the survivors stop by
  themselves (status 4, naming the lost process), and the next generation runs without the lost
  ones, unless fewer than ``min_processes`` remain (then the job ends, with the first failure's status);
* a lost slot came back (SIGUSR1 to the launcher: the machine is repaired, the pod rescheduled):
  once the generation has logged a step, every process is asked to stop (SIGTERM: they agree on
  a step and checkpoint it), and the next generation runs on every slot;
* anything else (a config error, a divergence, SIGINT or SIGTERM to the launcher) ends the job as
  the plain launcher would.

Every line of the launcher carries the seconds since it started (``[launch +12.34s]``), and each
restart ends with its timeline: when the survivors named the loss, stopped, the next generation
started, restored its checkpoint and logged its first step.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import time
from collections.abc import Sequence

from shardlib.cluster.elastic import ENV_ELASTIC
from shardlib.cluster.launch import Launcher, describe_status
from shardlib.cluster.supervise import EXIT_PEER_LOST

REJOIN_SIGNAL = signal.SIGUSR1
"""Sent to the elastic launcher: every lost slot is back; the job grows at its next step with a checkpoint."""

_STEP_LOGGED = re.compile(r"^step \d+/\d+ ")  # train.py's console line of a logged step (process 0)
_RESTORED = "resumed from "
_VERDICT = "error: lost process"


@dataclasses.dataclass
class Timeline:
    """Moments (``time.monotonic()``) of one restart, from the event that caused it to the first step after it."""

    cause: str  # "the loss of process 2", "growing back to 4 processes"
    start: float
    noticed: float | None = None  # a survivor named the lost process
    stopped: float | None = None  # every process of the generation had ended
    restarted: float | None = None  # the next generation's processes were started
    restored: float | None = None  # its process 0 restored the checkpoint
    resumed: float | None = None  # its process 0 logged a step

    def line(self) -> str:
        """``elastic timeline of the loss of process 2, seconds after it ended: survivors named it +0.01, ...``."""
        marks = [
            ("survivors named it", self.noticed),
            ("stopped", self.stopped),
            ("restarted", self.restarted),
            ("checkpoint restored", self.restored),
            ("first step logged", self.resumed),
        ]
        shown = ", ".join(f"{what} +{moment - self.start:.2f}" for what, moment in marks if moment is not None)
        return f"elastic timeline of {self.cause}, seconds after it: {shown}"


class ElasticLauncher:
    """Runs ``command`` on up to ``processes`` local processes, never fewer than ``min_processes`` (module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        min_processes: int,
        *,
        grace_s: float = 180.0,
        max_restarts: int = 20,
    ):
        if not 1 <= min_processes <= processes:
            raise ValueError(f"--min-processes must lie in 1..{processes} (--processes), got {min_processes}")
        self.command, self.slots, self.min_processes = command, processes, min_processes
        self.grace_s, self.max_restarts = grace_s, max_restarts
        self.available = processes
        self.started = time.monotonic()
        self.generation: Launcher | None = None
        self.timeline: Timeline | None = None
        self.timelines: list[Timeline] = []
        self._verdict_at: float | None = None  # when a survivor of this generation first named a lost process
        self._rejoin = self._growing = self._stopped_by_user = self._stepped = False

    def clock(self) -> str:
        return f" +{time.monotonic() - self.started:.2f}s"

    def say(self, text: str) -> None:
        print(f"[launch{self.clock()}] {text}", flush=True)

    def on_signal(self, signum, frame) -> None:
        """SIGINT, SIGTERM: the user's stop, passed on as by the plain launcher; ``REJOIN_SIGNAL``: slots back."""
        if signum == REJOIN_SIGNAL:
            self._rejoin = True
            return
        self._stopped_by_user = True
        if self.generation is not None:
            self.generation.on_signal(signum, frame)

    def run(self) -> int:
        """Runs generations until the job ends; returns the launcher's exit status."""
        self.say(f"elastic: up to {self.slots} processes, at least {self.min_processes}")
        for _ in range(self.max_restarts + 1):
            status = self._run_generation()
            next_count = self._next_count(status)
            if next_count is None:
                return status
            self.available = next_count
        self.say(f"elastic: {self.max_restarts} restarts, the most allowed: giving up")
        return status

    def _run_generation(self) -> int:
        self._growing = self._stepped = False
        self._verdict_at = None
        self.generation = Launcher(
            self.command,
            self.available,
            grace_s=self.grace_s,
            extra_env={ENV_ELASTIC: "1"},
            on_line=self._on_line,
            prefix=self.clock,
        )
        if self.timeline is not None:  # before start(): its processes' first lines may come at once
            self.timeline.restarted = time.monotonic()
        self.generation.start()
        return self.generation.wait(tick=self._tick)

    def _on_line(self, index: int, text: str) -> None:
        """Watches the processes' lines for the timeline: the survivors' verdict, the restore, the first step."""
        timeline = self.timeline
        if index == 0 and _STEP_LOGGED.match(text):
            self._stepped = True
        if text.startswith(_VERDICT) and self._verdict_at is None:
            self._verdict_at = time.monotonic()
        if timeline is None:
            return
        if text.startswith(_VERDICT) and timeline.noticed is None and timeline.restarted is None:
            timeline.noticed = time.monotonic()
        elif index == 0 and timeline.restarted is not None:
            if text.startswith(_RESTORED) and timeline.restored is None:
                timeline.restored = time.monotonic()
            elif _STEP_LOGGED.match(text) and timeline.resumed is None:
                timeline.resumed = time.monotonic()
                self.say(timeline.line())
                self.timelines.append(timeline)
                self.timeline = None

    def _tick(self) -> None:
        """Every 50 ms of a generation: the first loss starts a timeline; slots back start growing."""
        generation = self.generation
        assert generation is not None
        self._time_the_loss(generation)
        if not self._rejoin or not self._stepped or self._growing:
            return
        self._rejoin = False
        if self.available == self.slots:
            self.say("rejoin signal: no slot is missing, nothing to do")
            return
        self._growing = True
        self.timeline = Timeline(f"growing back to {self.slots} processes", time.monotonic())
        self.say(f"rejoin signal: asking the {self.available} processes to save a checkpoint and stop, to grow")
        generation.signal_all(signal.SIGTERM)

    def _time_the_loss(self, generation: Launcher) -> None:
        """Starts the timeline of the generation's first failure, once (from a tick, or at its end when
        the whole generation ended between two ticks)."""
        if generation.first_failure is not None and self.timeline is None and not self._growing:
            lost = generation.first_failure
            self.timeline = Timeline(f"the loss of process {lost}", generation.ended_at[lost], self._verdict_at)

    def _next_count(self, status: int) -> int | None:
        """The processes of the next generation after one that ended with ``status``, or None: the job ends."""
        generation = self.generation
        assert generation is not None
        self._time_the_loss(generation)
        if self.timeline is not None:
            self.timeline.stopped = max(generation.ended_at.values())
        if self._stopped_by_user:
            return None
        if status == 0:
            if not self._growing:
                return None
            self.say(f"elastic: every process stopped; restarting on all {self.slots}")
            return self.slots
        lost = [
            i
            for i, code in generation.codes.items()
            if code not in (0, EXIT_PEER_LOST) and i not in generation.terminated
        ]
        if failed := [i for i in lost if generation.codes[i] > 0]:
            self.say(
                f"elastic: process {failed[0]} failed ({describe_status(generation.codes[failed[0]])}), "
                "which a restart would not mend: not restarting"
            )
            return None
        left = self.available - len(lost)
        if left < self.min_processes:
            self.say(
                f"elastic: {left} of {self.slots} processes left, fewer than --min-processes {self.min_processes}: "
                "not restarting (the newest complete checkpoint resumes the run when more are back)"
            )
            return None
        gone = ", ".join(str(i) for i in sorted(lost)) or "none"
        self.say(f"elastic: lost process(es) {gone} of {self.available}; restarting on {left}")
        return left
