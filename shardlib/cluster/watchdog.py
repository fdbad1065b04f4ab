"""Lost peers: a process of a multi-process run dies, and the others must not hang.

What the runtime does by itself (measured on CPU with gloo, jax 0.10.2): a collective
with a dead peer fails at once with ``Gloo all-reduce failed ... Connection reset by
peer``, because the dead process's sockets close; the coordination service notices
missing heartbeats after ``heartbeat_timeout_seconds`` and then aborts every survivor
(SIGABRT, a C++ stack trace, the lost task named somewhere in it); if process 0 dies,
the service dies with it and the others abort within a second. Nothing hangs for
ever, but the message is buried and the time is the runtime's.

:class:`PeerWatchdog` makes that a bounded, named exit: every process publishes a
counter in the coordination service's key-value store a few times per
``peer_timeout_s`` and watches everyone else's. A counter that stops moving for
longer than the timeout names the lost process; this process then prints one line and
exits with status 4 (``os._exit``: the Python runtime's own shutdown would wait on the
dead peer). The runtime's heartbeat timeout is set to twice ours (``runtime_timeout``),
so the watchdog speaks first and the runtime stays as a backstop.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Self

import jax

EXIT_PEER_LOST = 4
"""train.py's status when another process of the run was lost."""

_PREFIX = "shardlib/alive/"
_DONE = "done"
# Exceptions that every process raises alike; waiting for a lost peer would only delay them.
_NOT_A_PEER_FAILURE = (ValueError, KeyboardInterrupt, SystemExit)


def runtime_timeout(peer_timeout_s: float) -> int:
    """``jax.distributed.initialize``'s heartbeat and shutdown timeouts for ``peer_timeout_s``."""
    return math.ceil(2 * peer_timeout_s)


def _coordination_client():
    """The client ``jax.distributed.initialize`` connected: JAX keeps it private, Orbax exposes it."""
    try:
        from orbax.checkpoint import multihost

        return multihost.get_jax_distributed_client()
    except (ImportError, AttributeError):  # an Orbax without the accessor: the same object, privately
        from jax._src import distributed

        return distributed.global_state.client


class PeerWatchdog:
    """Ends this process, naming the lost one, at most ``timeout_s`` after a peer process stops.

    A context manager for the part of a multi-process run during which every process
    must be alive; it does nothing in a single-process run. Leaving the block normally
    marks this process as done, so peers that are still saving or plotting do not
    count it as lost. Leaving it with an exception that may come from a lost peer
    (a failed collective, say) first waits for the verdict, so the error names the lost
    process rather than the collective.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        exit: Callable[[int], None] = os._exit,
        not_peer_failures: tuple[type[BaseException], ...] = (),
    ):
        """``not_peer_failures``: the caller's exceptions that every process raises alike (a diverged run)."""
        self.timeout_s = float(timeout_s)
        self._not_peer_failures = _NOT_A_PEER_FAILURE + tuple(not_peer_failures)
        # A detection takes up to the staleness limit plus two polls (the peer's beat and ours).
        self.poll_s = min(max(self.timeout_s / 10, 0.05), 5.0)
        self.stale_s = self.timeout_s - 2 * self.poll_s
        self._exit = exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self.lost: str | None = None  # the verdict, once there is one
        self._me = 0

    def __enter__(self) -> Self:
        if jax.process_count() == 1:
            return self
        self._client = _coordination_client()
        self._thread = threading.Thread(
            target=self._run,
            args=(jax.process_index(), jax.process_count()),
            name="shardlib-peer-watchdog",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._thread is None:
            return False
        if exc is not None and not isinstance(exc, self._not_peer_failures):
            print(
                f"{type(exc).__name__} in process {jax.process_index()}; checking for a lost peer "
                f"(up to {self.timeout_s:g} s)",
                file=sys.stderr,
                flush=True,
            )
            deadline = time.monotonic() + self.timeout_s + self.poll_s
            while self.lost is None and time.monotonic() < deadline:
                time.sleep(self.poll_s / 2)
        self._stop.set()
        self._thread.join()
        if exc is None:
            # If the service is gone, nobody is left to watch this process anyway.
            with contextlib.suppress(jax.errors.JaxRuntimeError):
                self._client.key_value_set(self._key(jax.process_index()), _DONE, allow_overwrite=True)
        return False

    @staticmethod
    def _key(process: int) -> str:
        return f"{_PREFIX}{process}"

    def _run(self, me: int, count: int) -> None:
        self._me = me
        peers = [p for p in range(count) if p != me]
        started = time.monotonic()
        seen: dict[int, tuple[str, float]] = {p: ("", started) for p in peers}
        beat = 0
        while not self._stop.wait(0 if beat == 0 else self.poll_s):
            beat += 1
            try:
                self._client.key_value_set(self._key(me), str(beat), allow_overwrite=True)
                values = dict(self._client.key_value_dir_get(_PREFIX))
            except jax.errors.JaxRuntimeError as err:  # the service lives in process 0: it is gone
                self._declare(f"lost process 0 of {count}, which runs the coordination service ({err})")
                return
            now = time.monotonic()
            for peer in peers:
                value = values.get(self._key(peer), "")
                if value == _DONE:
                    continue
                if value != seen[peer][0]:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self.stale_s:
                    silent = now - seen[peer][1]
                    self._declare(f"lost process {peer} of {count}: no sign of life for {silent:.1f} s")
                    return

    def _declare(self, what: str) -> None:
        if self._stop.is_set():  # the block ended normally meanwhile: nothing to report
            return
        self.lost = what
        print(
            f"error: {what} (faults.peer_timeout_s={self.timeout_s:g}); process {self._me} "
            "stops too. Completed checkpoints are kept: restart every process to resume.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        self._exit(EXIT_PEER_LOST)
