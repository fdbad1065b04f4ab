"""Lost peers: a process of a multi-process run dies, and the others must stop at once, saying so.

What the runtime does by itself (measured on CPU with gloo, jax 0.10.2): a collective
with a dead peer fails at once (``Gloo all-reduce failed ... Connection reset by peer``),
but a process blocked elsewhere (a barrier, the preemption sync point) learns nothing;
the coordination service notices missing heartbeats only after
``heartbeat_timeout_seconds`` and then aborts every survivor (SIGABRT, a C++ stack trace,
the lost task named somewhere in it). If process 0 dies the service dies with it, and the
runtime aborts the others within a second (``shardlib.cluster.supervise`` turns that into
the project's line and status).

:class:`PeerWatchdog` makes a loss a prompt, named exit. Every process holds a TCP link to
every other (``shardlib.cluster.peer_links``): a process that ends, however it ends, closes
them, and the others read EOF within milliseconds. A process that hangs, or a host that
vanishes, is caught by heartbeats instead: every process publishes a counter in the
coordination service's key-value store every ``poll_s`` (at most 1 s) and watches the
others'; one that stops moving for ``peer_timeout_s`` (less two polls) is lost. Either way
this process prints one line, naming the lost process and the checkpoint to resume from,
tells its peers, and exits with status 4 (``os._exit``: the Python runtime's own shutdown
would wait on the dead peer). The runtime's heartbeat timeout is twice ours
(``runtime_timeout``), so it stays a backstop.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Self

import jax

from shardlib.cluster.peer_links import DONE, LOST, PeerLinks
from shardlib.cluster.supervise import EXIT_PEER_LOST, note_verdict
from shardlib.training.faults import resume_advice

_PREFIX = "shardlib/alive/"
# Exceptions that every process raises alike; waiting for a lost peer would only delay them.
_NOT_A_PEER_FAILURE = (ValueError, KeyboardInterrupt, SystemExit)


def runtime_timeout(peer_timeout_s: float) -> int:
    """``jax.distributed.initialize``'s heartbeat and shutdown timeouts for ``peer_timeout_s``."""
    return math.ceil(2 * peer_timeout_s)


def _coordination_client() -> Any:  # JAX's client class is private (jaxlib), Orbax's accessor unannotated
    """The client ``jax.distributed.initialize`` connected: JAX keeps it private, Orbax exposes it."""
    try:
        from orbax.checkpoint import multihost

        return multihost.get_jax_distributed_client()
    except (ImportError, AttributeError):  # an Orbax without the accessor: the same object, privately
        from jax._src import distributed

        return distributed.global_state.client


def _coordinator_address() -> str:
    from jax._src import distributed

    # Optional in JAX's state; set by jax.distributed.initialize, which every multi-process run (our only caller) ran.
    return distributed.global_state.coordinator_address  # type: ignore[return-value]


class PeerWatchdog:
    """Ends this process, naming the lost one, as soon as a peer process ends (at most ``timeout_s`` after
    one stops answering).

    A context manager for the part of a multi-process run during which every process
    must be alive; it does nothing in a single-process run. Leaving the block normally, or
    with an exception every process raises alike (``not_peer_failures``), tells the peers
    this process leaves in order, so peers still saving or plotting do not count it as lost.
    Leaving it with another exception (a failed collective, say) first waits up to
    ``timeout_s`` for the verdict, so the error names the lost process rather than the
    collective; without one, this process failed alone, and its peers will call it lost.
    The verdict's line ends with the checkpoint to restart from (``faults.resume_advice``).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        exit: Callable[[int], None] = os._exit,
        not_peer_failures: tuple[type[BaseException], ...] = (),
        checkpoints: pathlib.Path | None = None,
    ):
        """``checkpoints``: the run's checkpoint directory, whose newest complete step the verdict names."""
        self.timeout_s = float(timeout_s)
        self._not_peer_failures = _NOT_A_PEER_FAILURE + tuple(not_peer_failures)
        # A detection by heartbeat takes up to the staleness limit plus two polls (the peer's beat and ours).
        self.poll_s = min(max(self.timeout_s / 10, 0.05), 1.0)
        self.stale_s = self.timeout_s - 2 * self.poll_s
        self._exit = exit
        self._checkpoints = checkpoints
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None  # the coordination client (``_coordination_client``), set by __enter__
        self.links: PeerLinks | None = None  # set by the watchdog's thread once every link is up
        self.lost: str | None = None  # the verdict, once there is one
        self._me, self._count = 0, 1
        self._done: set[int] = set()

    def __enter__(self) -> Self:
        if jax.process_count() == 1:
            return self
        self._client = _coordination_client()
        self._me, self._count = jax.process_index(), jax.process_count()
        self._thread = threading.Thread(target=self._run, name="shardlib-peer-watchdog", daemon=True)
        self._thread.start()
        threading.Thread(target=self._connect, args=(_coordinator_address(),), daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if self._thread is None:
            return False
        in_order = exc is None or isinstance(exc, self._not_peer_failures)
        if not in_order:
            deadline = time.monotonic() + self.timeout_s + self.poll_s
            while self.lost is None and time.monotonic() < deadline:
                time.sleep(self.poll_s / 2)
        self._stop.set()
        self._thread.join()
        if self.links is not None:
            if in_order:  # otherwise this process failed alone: its peers are right to call it lost
                self.links.tell_all(DONE)
            self.links.close()
        if in_order:  # if the service is gone, nobody is left to watch this process anyway
            with contextlib.suppress(jax.errors.JaxRuntimeError):
                self._client.key_value_set(f"{_PREFIX}{self._me}", DONE, allow_overwrite=True)
        return False

    def _connect(self, coordinator: str) -> None:
        """Sets up the links (``PeerLinks``) beside the heartbeats; without them, heartbeats alone watch."""
        with contextlib.suppress(OSError, jax.errors.JaxRuntimeError):
            links = PeerLinks(self._client, self._me, self._count, coordinator, connect_timeout_s=self.timeout_s)
            if self._stop.is_set():
                links.close()
            else:
                self.links = links

    def _run(self) -> None:
        peers = [p for p in range(self._count) if p != self._me]
        started = time.monotonic()
        seen: dict[int, tuple[str, float]] = {p: ("", started) for p in peers}
        beat, next_beat = 0, started
        while not self._stop.is_set():
            if (links := self.links) is not None:
                for peer, message in links.poll(self.poll_s / 2):
                    if verdict := self._link_event(peer, message):
                        return self._declare(*verdict)
            else:
                self._stop.wait(self.poll_s / 2)
            if (now := time.monotonic()) < next_beat or self._stop.is_set():
                continue
            beat, next_beat = beat + 1, now + self.poll_s
            try:
                self._client.key_value_set(f"{_PREFIX}{self._me}", str(beat), allow_overwrite=True)
                values = dict(self._client.key_value_dir_get(_PREFIX))
            except jax.errors.JaxRuntimeError:  # the service lives in process 0: it is gone
                return self._declare(0, f"lost process 0 of {self._count}, which runs the coordination service")
            for peer in peers:
                value = values.get(f"{_PREFIX}{peer}", "")
                if value == DONE or peer in self._done:
                    continue
                if value != seen[peer][0]:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self.stale_s:
                    return self._declare(
                        peer,
                        f"lost process {peer} of {self._count}: no heartbeat within "
                        f"faults.peer_timeout_s ({self.timeout_s:g} s)",
                    )
        return None

    def _link_event(self, peer: int, message: str) -> tuple[int, str] | None:
        """The verdict (lost process, words) a link's ``message`` gives (``peer_links``), if any."""
        if message == DONE:
            self._done.add(peer)
        elif message.startswith(f"{LOST} "):
            lost = int(message.split()[1])
            return lost, f"lost process {lost} of {self._count} (process {peer} saw it end)"
        elif message == "" and peer not in self._done:
            return peer, f"lost process {peer} of {self._count}: it ended (its link to process {self._me} closed)"
        return None

    def _declare(self, lost: int, what: str) -> None:
        if self._stop.is_set():  # the block ended normally meanwhile: nothing to report
            return
        self.lost = what
        advice = resume_advice(self._checkpoints) if self._checkpoints else "restart every process to resume"
        line = f"error: {what}; process {self._me} stops too. {advice}"
        note_verdict(line)  # for the supervisor: the line is said, it must not say another
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        if self.links is not None:
            self.links.tell_all(f"{LOST} {lost}")
            if self._me == 0:  # the service lives here: let the others hear the verdict before it goes
                deadline = time.monotonic() + 2.0
                while self.links.open_peers - {lost} and time.monotonic() < deadline:
                    self.links.poll(0.05)
        self._exit(EXIT_PEER_LOST)
