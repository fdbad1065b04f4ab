"""What a run directory belongs to: a fingerprint of the config, checked on every start.

A run directory is one training run. Starting ``train.py`` again there
resumes it, which is only right when the config still describes the same
run. Each start appends ``{started_at, start_step, fingerprint, config}`` to
``config-history.jsonl`` (one JSON object a line, never rewritten) and writes
the current config to ``config.json`` as before, for readers that want it.

The fingerprint holds the keys that define what is trained and on what:

* ``model.*``: the shapes and numerics of the parameters;
* ``data.*``, ``seed``, ``batch_size``, ``seq_len``: which tokens, in which order;
* ``grad_compression``: its error-feedback residuals are part of the optimizer state.

Everything else may change between starts: ``steps`` and the logging,
evaluation and checkpoint intervals; ``run_dir``; ``faults`` and
``peak_tflops``; the optimizer's hyper-parameters (resuming with a lower
``lr`` is the fix ``shardlib.training.faults`` suggests after a divergence);
``grad_accum`` (the same batch, split differently); and how the run is laid
out on the hardware (``mesh``, ``sharding``, ``pipeline``, ``attention``),
since a checkpoint restores onto another mesh or preset (README,
Checkpoints).

A start whose fingerprint differs from the last recorded one is a
:class:`RunMismatch`, raised before any checkpoint is opened, so that Orbax
never prunes (or even lists) the old run's checkpoints. ``--restart``
(:func:`restart_run_dir`) starts over in a new directory beside the old one
(``runs/x`` -> ``runs/x-2``): nothing is ever deleted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from shardlib.training.config import Config, config_to_dict
from shardlib.training.faults import RunDirError

HISTORY_FILE = "config-history.jsonl"
CONFIG_FILE = "config.json"
# Top-level keys (or sections) of Config whose leaves make up the fingerprint.
FINGERPRINT_KEYS = ("model", "data", "seed", "batch_size", "seq_len", "grad_compression")


class RunMismatch(RunDirError):
    """The run directory holds a run of another config; the message names the keys that differ."""


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out |= _flatten(inner, f"{prefix}.{key}")
        return out
    return {prefix: value}


def fingerprint(config: dict) -> dict[str, Any]:
    """{dotted key: value} of the run-defining keys of a config dict (``config_to_dict``)."""
    out: dict[str, Any] = {}
    for key in FINGERPRINT_KEYS:
        if key in config:
            out |= _flatten(config[key], key)
    return out


def digest(fp: dict[str, Any]) -> str:
    """A short, stable name for a fingerprint (sha256 of its sorted JSON)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def recorded_fingerprint(run_dir: pathlib.Path) -> dict[str, Any] | None:
    """The fingerprint of the last start recorded in ``run_dir``, or None if it records none.

    From the last line of ``config-history.jsonl``; a directory written before
    the history existed has only ``config.json``, whose config gives it.
    """
    history = run_dir / HISTORY_FILE
    if history.is_file():
        lines = [line for line in history.read_text().splitlines() if line.strip()]
        for line in reversed(lines):
            try:
                return json.loads(line)["fingerprint"]
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
                continue
    config = run_dir / CONFIG_FILE
    if config.is_file():
        try:
            return fingerprint(json.loads(config.read_text()))
        except json.JSONDecodeError as err:
            raise RunDirError(f"{config} is not valid JSON ({err}); fix or remove it to resume") from err
    return None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) where both record the key and the values differ.

    A key only one side has comes from another version of the schema, not from the user.
    """
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys()) if old[key] != new[key]]


def check_resume(run_dir: pathlib.Path, cfg: Config) -> None:
    """Raises RunMismatch if ``run_dir`` records a run whose fingerprint differs from ``cfg``'s.

    Touches nothing: call it before a checkpoint manager exists. Every process
    reads the same files, so all of them agree.
    """
    old = recorded_fingerprint(run_dir)
    if old is None:
        return
    changed = differences(old, json.loads(json.dumps(fingerprint(config_to_dict(cfg)))))  # as stored
    if not changed:
        return
    listed = ", ".join(f"{key} {json.dumps(a)} -> {json.dumps(b)}" for key, a, b in changed)
    raise RunMismatch(
        f"run_dir {run_dir} holds a run of another config ({listed}); resume it with the old "
        f"values, or start over with --restart (a new directory such as {_numbered(run_dir, 2)}; "
        "nothing is deleted)"
    )


def record_start(run_dir: pathlib.Path, cfg: Config, start_step: int) -> None:
    """Appends this start to ``config-history.jsonl`` and writes ``config.json`` (process 0 only)."""
    config = config_to_dict(cfg)
    fp = fingerprint(config)
    entry = {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "start_step": start_step,
        "fingerprint_digest": digest(fp),
        "fingerprint": fp,
        "config": config,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _numbered(run_dir: pathlib.Path, n: int) -> pathlib.Path:
    return run_dir.with_name(f"{run_dir.name}-{n}")


def _in_use(run_dir: pathlib.Path) -> bool:
    return run_dir.exists() and any(run_dir.iterdir())


def restart_run_dir(run_dir: pathlib.Path) -> pathlib.Path:
    """The directory a ``--restart`` run uses: ``run_dir`` if it is empty or absent, else the first
    free ``run_dir-2``, ``run_dir-3``, ... Process 0 chooses, and every process uses its choice."""
    n = 1
    if _in_use(run_dir):
        n = 2
        while _in_use(_numbered(run_dir, n)):
            n += 1
    if jax.process_count() > 1:
        n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
    return run_dir if n == 1 else _numbered(run_dir, n)
