"""One process of a multi-process run, supervised: the runtime's own output in a log, its abort in one line.

JAX's distributed runtime speaks to the terminal in its own voice: gloo's ``[Gloo] Rank 0
is connected to 1 peer ranks`` lines on stdout at every new communicator, glog lines on
stderr, and, when process 0 (which runs the coordination service) dies, a C++ abort of
every other process within a second (``client.h: Terminating process because the JAX
distributed service detected fatal errors``, a stack trace, SIGABRT) that no Python code
can catch: the runtime's own handler calls ``abort()``, and the one a caller may pass
(``missed_heartbeat_callback``) cannot be called from Python (``std::bad_cast``, jax 0.10.2).

So a process that joins a run (``shardlib.cluster.join``) becomes two. The supervisor
(:func:`supervise`) opens the run's log, ``run_dir/logs/process-I.log``, and runs the
same command again as its child, in a process group of its own (a terminal's Ctrl-C
reaches the supervisor only, which passes SIGINT, SIGTERM and SIGHUP on, once). The child
(:func:`divert_runtime_output`) points its file descriptors 1 and 2, where the C++ runtime
writes, at the log, and keeps Python's ``sys.stdout`` and ``sys.stderr`` on the terminal:
every line of the project's still shows, nothing of the runtime's does, and the log
keeps all of it. The child dies with its supervisor (``PR_SET_PDEATHSIG``). When the
child ends, the supervisor exits with its status; when the runtime aborted it for a lost
peer (SIGABRT, its fatal message in the log) and the watchdog had not said so first
(``note_verdict``), the supervisor prints the project's line for it, naming the lost
process and the checkpoint to resume from, and exits with status 4. Any other signal
that ended the child ends the supervisor too, so whoever waits sees the same status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import NoReturn

from shardlib.training.faults import RunDirError

EXIT_PEER_LOST = 4
"""train.py's status when another process of the run was lost."""

ENV_LOG_FD = "SHARDLIB_RUNTIME_LOG_FD"  # set for the child: the log's descriptor, inherited
ENV_SUPERVISOR = "SHARDLIB_SUPERVISOR_PID"
VERDICT_MARK = "shardlib: said: "
_RUNTIME_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 1 << 16
_diverted = False  # whether fds 1 and 2 of this process write to the runtime's log


def is_supervised() -> bool:
    """Whether this process is the child of a supervisor (``supervise`` started it)."""
    return ENV_LOG_FD in os.environ


def log_path(logs: pathlib.Path, settings: dict) -> pathlib.Path:
    """``logs/process-I.log`` for the process index the settings or the scheduler give, else host and pid."""
    index = settings.get("process_id", os.environ.get("SLURM_PROCID"))
    name = index if index is not None else f"{os.uname().nodename}-{os.getpid()}"
    return logs / f"process-{name}.log"


def supervise(log: pathlib.Path, resume_advice: Callable[[], str]) -> NoReturn:
    """Runs this process's command again as a supervised child and exits as it ended (module docstring).

    Raises RunDirError, before anything starts, if ``log`` cannot be written."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        raise RunDirError(f"the runtime's log {log} cannot be written ({err.strerror or err})") from err
    env = {**os.environ, ENV_LOG_FD: str(fd), ENV_SUPERVISOR: str(os.getpid())}
    sys.stdout.flush()
    sys.stderr.flush()
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, pass_fds=(fd,), process_group=0)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    os.close(fd)
    status = outcome(code, _tail(log), log, resume_advice)
    if status < 0:  # ended by a signal: end the same way
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the interpreter's shutdown after importing JAX takes seconds (1.4 s measured on a
    # busy machine), which an elastic restart would wait for; the supervisor has nothing to clean up.
    os._exit(status)


def outcome(code: int, log_tail: str, log: pathlib.Path, resume_advice: Callable[[], str]) -> int:
    """The supervisor's status for its child's ``code`` (``Popen.returncode``); prints the lost-peer line
    when the runtime aborted the child for one and nobody said so. Negative: end by that signal."""
    if code != -signal.SIGABRT or (what := runtime_verdict(log_tail)) is None:
        return code
    if VERDICT_MARK not in log_tail:  # the watchdog spoke first otherwise, and the runtime came after
        print(
            f"error: {what}; the runtime stopped this process. {resume_advice()} (the runtime's log: {log})",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_PEER_LOST


def runtime_verdict(text: str) -> str | None:
    """The lost process, in words, from the runtime's fatal message in ``text`` (its log); None without one."""
    fatal = text.rfind(_RUNTIME_FATAL)
    if fatal < 0:
        return None
    message = text[fatal:]
    if unhealthy := re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)", message):
        tasks = ", ".join(re.findall(r"\d+", unhealthy.group(1)))
        return f"lost process {tasks}: the coordination service had no heartbeat from it"
    if "Failed to send RPC to coordination service" in message:
        return "lost process 0, which runs the coordination service"
    return "lost a peer process: the JAX distributed service reported a fatal error"


def _tail(log: pathlib.Path) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - _LOG_TAIL_BYTES))
        return f.read().decode(errors="replace")


def divert_runtime_output() -> None:
    """In the supervised child: fds 1 and 2 (the C++ runtime's stdout and stderr) to the log, Python's
    ``sys.stdout`` and ``sys.stderr`` kept on the terminal; the child dies with its supervisor."""
    global _diverted
    _die_with_supervisor(int(os.environ[ENV_SUPERVISOR]))
    log_fd = int(os.environ.pop(ENV_LOG_FD))
    os.environ.pop(ENV_SUPERVISOR)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        stream.flush()
        terminal = os.dup(fd)
        os.dup2(log_fd, fd)
        kept = os.fdopen(terminal, "w", buffering=1, encoding=stream.encoding, errors=stream.errors)
        setattr(sys, name, kept)
    os.close(log_fd)
    _diverted = True


def _die_with_supervisor(supervisor: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere the child may outlive it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before the request took effect
        os._exit(128 + signal.SIGKILL)


def note_verdict(line: str) -> None:
    """Records in the runtime's log that this process said ``line`` (the supervisor then says nothing)."""
    if _diverted:
        with contextlib.suppress(OSError):
            os.write(2, f"{VERDICT_MARK}{line}\n".encode())
