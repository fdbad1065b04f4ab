"""A TCP connection between every two processes of a run: a process that dies is noticed at once.

When a process ends, however it ends (SIGKILL, OOM kill, a segfault), its kernel closes its
sockets, and the other end reads EOF within milliseconds, on any host; only a lost host or
a cut network goes unnoticed, which the watchdog's heartbeats cover
(``shardlib.cluster.watchdog``). Each process listens on a port of the address it reaches
the coordinator from, publishes ``host:port`` in the coordination service's key-value store,
and connects to every process of lower index; the one of higher index connects, so each pair
has one connection.

Messages are lines: ``done`` (this process leaves in order: its EOF is no loss) and
``lost P`` (this process lost process P, and exits: its EOF is not a second loss).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import time
from typing import cast

_KEY = "shardlib/link/"
DONE = "done"
LOST = "lost"


def local_address(coordinator: str) -> str:
    """The address of this host on the route to ``coordinator`` (host:port): where peers can reach it."""
    host, _, port = coordinator.rpartition(":")
    family, kind, _, _, address = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind) as probe:
        probe.connect(address)  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


class PeerLinks:
    """This process's connections to every other one; ``poll`` reports what they said or that they closed.

    ``client``: the coordination service's client (its key-value store); ``me``, ``count``: this
    process's index and the run's number of processes.
    """

    def __init__(self, client, me: int, count: int, coordinator: str, *, connect_timeout_s: float):
        self.me, self.count = me, count
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, int] = {}
        self._buffers: dict[int, bytes] = {}
        host = local_address(coordinator)
        with socket.create_server((host, 0), family=_family(host), backlog=count) as server:
            client.key_value_set(f"{_KEY}{me}", f"[{host}]:{server.getsockname()[1]}", allow_overwrite=True)
            for peer in range(me):  # lower indices listen for us
                peer_host, _, port = _published(client, f"{_KEY}{peer}", connect_timeout_s).rpartition(":")
                link = socket.create_connection((peer_host.strip("[]"), int(port)), timeout=connect_timeout_s)
                link.sendall(struct.pack("!I", me))
                self._add(link, peer)
            server.settimeout(connect_timeout_s)
            for _ in range(me + 1, count):  # higher indices connect to us, in any order
                link, _ = server.accept()
                link.settimeout(connect_timeout_s)
                (peer,) = struct.unpack("!I", _read_exactly(link, 4))
                self._add(link, peer)

    def _add(self, link: socket.socket, peer: int) -> None:
        link.setblocking(False)
        self._peers[link] = peer
        self._buffers[peer] = b""
        self._selector.register(link, selectors.EVENT_READ)

    def poll(self, timeout_s: float) -> list[tuple[int, str]]:
        """(peer, message) events within ``timeout_s``: a line it sent, or ``""`` when its connection closed."""
        events = []
        for key, _ in self._selector.select(timeout_s):
            link = cast(socket.socket, key.fileobj)  # the selector holds only the sockets _add registered
            peer = self._peers[link]
            try:
                data = link.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._selector.unregister(link)
                link.close()
                events.append((peer, ""))
                continue
            *lines, self._buffers[peer] = (self._buffers[peer] + data).split(b"\n")
            events += [(peer, line.decode(errors="replace")) for line in lines if line]
        return events

    def tell_all(self, message: str) -> None:
        """Sends ``message`` to every peer still connected (best effort: a closed one is skipped)."""
        for link in list(self._peers):
            with contextlib.suppress(OSError):
                link.setblocking(True)
                link.settimeout(1.0)
                link.sendall(f"{message}\n".encode())

    @property
    def open_peers(self) -> set[int]:
        return {self._peers[cast(socket.socket, key.fileobj)] for key in self._selector.get_map().values()}

    def close(self) -> None:
        for link in list(self._peers):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(link)
            link.close()
        self._selector.close()


def _published(client, key: str, timeout_s: float) -> str:
    """The value of ``key`` once a peer has set it, polled with the non-blocking ``key_value_dir_get``. With
    the client's blocking get instead, one launched run of three stalled at its start: the other process's
    gloo rendezvous waited past its 30 s deadline (jax 0.10.2; the cause was not pinned down)."""
    deadline = time.monotonic() + timeout_s
    while (value := dict(client.key_value_dir_get(_KEY)).get(key)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no peer published {key} within {timeout_s:g} s")
        time.sleep(0.05)
    return value


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _read_exactly(link: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = link.recv(size - len(data))
        if not chunk:
            raise ConnectionError("a peer closed its link before saying who it is")
        data += chunk
    return data
