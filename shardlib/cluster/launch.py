"""Start a multi-process run on one machine: ``python -m shardlib.cluster.launch --processes 2 -- train.py ...``.

Each process gets the coordinator (127.0.0.1 and a free port), the number of processes
and its id through ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, runs on the CPU with gloo collectives, and has its output prefixed
with ``[pI]``. SIGINT and SIGTERM are passed on to every process as SIGTERM, which makes
``train.py`` save a checkpoint and exit 0; a second SIGINT kills them. When a process
fails, the launcher says which one failed first and how, gives the others ``--grace``
seconds to stop by themselves (``train.py`` notices a process that ended at once, one that
hangs within ``faults.peer_timeout_s``) and then ends them. Its exit status is 0 when every process
succeeded, else the status of the first one that failed (128 + N for signal N). With
``--elastic`` the job restarts on the processes left after a loss, and grows back after SIGUSR1
(``shardlib.cluster.elastic_launch``).
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from shardlib.cluster.join import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

# What train.py's statuses mean (shardlib.training.cli, shardlib.training.faults).
_MEANING = {2: "error", 3: "loss diverged", 4: "lost a peer process", 130: "interrupted"}
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(environ: dict[str, str], coordinator: str, processes: int, index: int) -> dict[str, str]:
    """``environ`` plus what process ``index`` needs to join the run on this machine's CPU."""
    env = dict(environ)
    env[ENV_COORDINATOR] = coordinator
    env[ENV_NUM_PROCESSES] = str(processes)
    env[ENV_PROCESS_ID] = str(index)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive while they happen, not when a buffer fills
    # The mesh file's emulate_cpu_devices decides the device count; a leftover flag would only confuse.
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def describe_status(code: int) -> str:
    """``exit status 4 (lost a peer process)``, ``killed by SIGKILL``, ..."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    meaning = _MEANING.get(code)
    return f"exit status {code}" + (f" ({meaning})" if meaning else "")


def _command(command: Sequence[str]) -> list[str]:
    # A script or -m runs under this interpreter, so the venv's packages come along.
    if command[0].endswith(".py") or command[0] == "-m":
        return [sys.executable, *command]
    return list(command)


def _pump(
    stream, prefix: str, out, lock: threading.Lock, every_s: float = 10.0, on_line: Callable[[str], None] | None = None
) -> None:
    """Copies ``stream`` to ``out`` line by line with ``prefix``; ``on_line`` sees each line shown, unprefixed.

    A piece ended by \\r is a progress bar redrawing itself: only one every ``every_s``
    seconds is shown, so a bar neither floods the output nor stays invisible until done.
    """
    buffer, shown = b"", float("-inf")
    while chunk := os.read(stream.fileno(), 65536):
        buffer += chunk
        while (cut := min((i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0), default=-1)) >= 0:
            piece, ender, buffer = buffer[:cut], buffer[cut : cut + 1], buffer[cut + 1 :]
            if ender == b"\r":
                if time.monotonic() - shown < every_s:
                    continue
                shown = time.monotonic()
            _write(out, lock, prefix, piece, on_line)
    _write(out, lock, prefix, buffer, on_line)
    stream.close()


def _write(out, lock: threading.Lock, prefix: str, piece: bytes, on_line: Callable[[str], None] | None) -> None:
    text = piece.decode(errors="replace").rstrip()
    if text.strip():
        with lock:
            out.write(f"{prefix}{text}\n")
            out.flush()
        if on_line is not None:
            on_line(text)


class Launcher:
    """N local processes of one command, watched together.

    ``extra_env``: set for every process besides the run's variables; ``on_line(index, text)``: sees
    every line a process prints; ``prefix``: what the launcher's own lines start with, after ``[launch``.
    After :meth:`wait`, ``codes`` holds every process's status and ``terminated`` the processes the
    launcher had to end itself.
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        port: int | None = None,
        grace_s: float = 180.0,
        extra_env: dict[str, str] | None = None,
        on_line: Callable[[int, str], None] | None = None,
        prefix: Callable[[], str] = str,
    ):
        self.command = _command(command)
        self.processes = processes
        self.coordinator = f"127.0.0.1:{port or free_port()}"
        self.grace_s = grace_s
        self.extra_env = extra_env or {}
        self.on_line = on_line
        self.prefix = prefix
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.lock = threading.RLock()  # also taken by the signal handler, in the main thread
        self._interrupts = 0
        self.codes: dict[int, int] = {}
        self.ended_at: dict[int, float] = {}  # time.monotonic() when each process was seen to end
        self.first_failure: int | None = None
        self.terminated: set[int] = set()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[launch{self.prefix()}] {text}", flush=True)

    def start(self) -> None:
        """Starts every process; each in its own session, so a terminal's Ctrl-C reaches only the launcher."""
        self.say(f"{self.processes} processes, coordinator {self.coordinator}: {' '.join(self.command)}")
        for index in range(self.processes):
            proc = subprocess.Popen(
                self.command,
                env=child_env(dict(os.environ), self.coordinator, self.processes, index) | self.extra_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(proc)
            self.say(f"process {index}: pid {proc.pid}")
            watch = None if self.on_line is None else functools.partial(self.on_line, index)
            pump = threading.Thread(
                target=_pump, args=(proc.stdout, f"[p{index}] ", sys.stdout, self.lock, 10.0, watch), daemon=True
            )
            pump.start()
            self.pumps.append(pump)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_signal(self, signum, frame) -> None:
        self._interrupts += signum == signal.SIGINT
        if self._interrupts > 1:
            self.say("second SIGINT: killing every process")
            self.signal_all(signal.SIGKILL)
        else:
            self.say(f"{signal.Signals(signum).name}: asking every process to save a checkpoint and stop")
            self.signal_all(signal.SIGTERM)

    def wait(self, tick: Callable[[], None] = lambda: None) -> int:
        """Waits for every process, calling ``tick`` every 50 ms; returns the launcher's exit status."""
        ended: queue.Queue[tuple[int, int]] = queue.Queue()  # (index, status) in the order they end
        for index, proc in enumerate(self.procs):
            threading.Thread(target=lambda i=index, p=proc: ended.put((i, p.wait())), daemon=True).start()
        codes = self.codes
        first_failure: int | None = None
        terminate_at = kill_at = float("inf")
        while len(codes) < len(self.procs):
            try:
                index, code = ended.get(timeout=0.05)
            except queue.Empty:
                pass
            else:
                codes[index] = code
                self.ended_at[index] = time.monotonic()
                self.say(f"process {index} ended: {describe_status(code)}")
                if code != 0 and first_failure is None:
                    first_failure = self.first_failure = index
                    terminate_at = time.monotonic() + self.grace_s
                    if len(codes) < len(self.procs):
                        self.say(f"process {index} failed first; waiting up to {self.grace_s:g} s for the others")
            tick()
            now = time.monotonic()
            if now > terminate_at:
                self.say(f"the others did not stop within {self.grace_s:g} s: terminating them")
                self.terminated = set(range(len(self.procs))) - set(codes)
                self.signal_all(signal.SIGTERM)
                terminate_at, kill_at = float("inf"), now + 10
            if now > kill_at:
                self.signal_all(signal.SIGKILL)
                kill_at = float("inf")
        for pump in self.pumps:  # every line out before the verdict
            pump.join(timeout=5)
        if first_failure is None:
            self.say("every process succeeded")
            return 0
        code = codes[first_failure]
        self.say(f"failed: process {first_failure} was the first to fail ({describe_status(code)})")
        return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shardlib.cluster.launch --processes N [--port P] [--grace S] [--elastic [--min-processes K]]
    -- COMMAND ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m shardlib.cluster.launch",
        description="Run COMMAND as N processes of one jax.distributed run on this machine (CPU, gloo).",
    )
    parser.add_argument("--processes", "-n", type=int, required=True, help="number of processes")
    parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument(
        "--grace",
        type=float,
        default=180.0,
        help="seconds the others get to stop by themselves after one fails (default 180)",
    )
    parser.add_argument(
        "--elastic",
        action="store_true",
        help="restart the job on the processes left when some are lost, and on all of them again after "
        "SIGUSR1 (a lost slot is back); each process runs train.py --elastic (docs/multihost.md, Elastic runs)",
    )
    parser.add_argument(
        "--min-processes",
        type=int,
        metavar="K",
        help="with --elastic: end the job instead of restarting on fewer than K processes (default: 1)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. train.py --config ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; e.g. -- train.py --config configs/tiny.yaml --mesh meshes/cpu-2x4.yaml")
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.min_processes is not None and not args.elastic:
        parser.error("--min-processes needs --elastic")
    if args.elastic:
        return _run_elastic(command, args, parser)
    launcher = Launcher(command, args.processes, port=args.port, grace_s=args.grace)
    signal.signal(signal.SIGINT, launcher.on_signal)
    signal.signal(signal.SIGTERM, launcher.on_signal)
    launcher.start()
    return launcher.wait()


def _run_elastic(command: list[str], args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from shardlib.cluster.elastic_launch import REJOIN_SIGNAL, ElasticLauncher

    if args.port is not None:
        parser.error("--port cannot be combined with --elastic: every restart takes a free port of its own")
    try:
        elastic = ElasticLauncher(command, args.processes, args.min_processes or 1, grace_s=args.grace)
    except ValueError as err:
        parser.error(str(err))
    for signum in (signal.SIGINT, signal.SIGTERM, REJOIN_SIGNAL):
        signal.signal(signum, elastic.on_signal)
    return elastic.run()


if __name__ == "__main__":
    sys.exit(main())
