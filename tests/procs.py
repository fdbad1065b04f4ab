"""Helpers for tests that run train.py and the launcher as real processes (to kill them)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import yaml

from shardlib.training.config import Config, config_to_dict

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_config(cfg: Config, path: pathlib.Path) -> pathlib.Path:
    """``cfg`` as a YAML file that train.py reads back into the same config."""
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def env(compile_cache: pathlib.Path | None = None) -> dict[str, str]:
    """The test process's environment (its XLA_FLAGS included) for a child, unbuffered.

    ``compile_cache`` turns on JAX's persistent compilation cache: a restarted
    process loads the executables its predecessor compiled, which halves the CPU
    time of these tests and runs the same machine code.
    """
    child = dict(os.environ, PYTHONUNBUFFERED="1")
    if compile_cache is not None:
        child |= {
            "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
    return child


class Proc:
    """A child process whose merged output is collected, line by line with arrival times, as it runs."""

    def __init__(self, args: list[str], child_env: dict[str, str]):
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> int:
        """Exit status; kills the process and fails the test if it outlives ``timeout``."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            self._reader.join(timeout=5)
            raise AssertionError(f"process did not end within {timeout} s; output:\n{self.output[-4000:]}") from None
        self._reader.join(timeout=5)
        return code

    def line_time(self, text: str) -> float | None:
        """When the first line containing ``text`` arrived, or None."""
        return next((t for t, line in self.lines if text in line), None)


def wait_until(predicate, timeout: float, proc: Proc | None = None, what: str = "condition") -> None:
    """Polls ``predicate`` every 5 ms; fails if ``proc`` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(
                f"process ended (status {proc.popen.returncode}) before {what}:\n{proc.output[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.005)


def train_rows(run_dir: pathlib.Path) -> list[dict]:
    """The training rows of ``run_dir/metrics.jsonl`` in the order written (resumed runs append)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by SIGKILL; the next start drops it
            continue
        if row["split"] == "train":
            rows.append(row)
    return rows


def last_logged_step(run_dir: pathlib.Path) -> int:
    rows = train_rows(run_dir)
    return rows[-1]["step"] if rows else 0
