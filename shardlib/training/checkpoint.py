"""Sharded, asynchronous checkpoints with Orbax, checksummed, with one-line errors.

Each checkpoint step holds two items: ``state`` (parameters and optimizer
state, written shard by shard by every process) and ``meta`` (JSON: step,
data-loader position and a checksum of every array). Orbax writes a step into
a temporary directory and renames it only when complete, so ``latest_step``
never sees a partial save. A save cut short by a hard kill leaves that
temporary directory behind (``incomplete_saves``); it is never restored from,
and Orbax replaces it when the same step is saved again.
Restoring always goes through an abstract target that carries the current
mesh's shardings, which is what lets a run saved on 8 devices continue on 4.

Checksums. Orbax and tensorstore do not notice bytes garbled on disk: a data
file overwritten in place with random bytes of the same length restores as
wrong numbers. So every saved array gets a 64-bit digest (``array_digest``)
in the ``meta`` item, and ``restore`` recomputes it on what it read. The
digest is a sum, modulo 2**32, over elements of a murmur3-mixed hash of
(element bits, flat index), in two lanes. Sums of integers are exact in any
order, so the digest of the *global* array does not depend on how it is
sharded: every process of a run restored onto another mesh, another device
count or another number of processes gets the same number and verifies the
whole array (a per-shard crc32 could only be checked by a process that reads
back the very shards it wrote). It is computed on the devices by one jitted
reduction (one read of the state, no host copy), and fetching the few bytes
it yields waits for the same step that Orbax's own device-to-host copy waits
for, so the training loop gains no new synchronisation point.

Errors. Orbax reports a failed background write (a full disk) by logging
the same traceback from several threads and then raising at the next wait;
tensorstore's callbacks and asyncio add "Event loop is closed" and "Task
exception was never retrieved". While a :class:`Checkpointer` is open,
absl's ERROR records are held back (``Checkpointer.noise.held``); the other
two are dropped whenever they name Orbax or tensorstore. Every failure
surfaces once, as a one-line :class:`CheckpointError` that names the step
and path, at the call that found it (``save``, ``wait``, ``close``,
``restore``); the step saved before a failed save is never pruned, because
Orbax prunes only after a save completes.
"""

from __future__ import annotations

import collections
import datetime
import functools
import logging
import os
import pathlib
import re
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any
# Orbax's suffix for a step directory that is still being written (0.12: "5.orbax-checkpoint-tmp").
TMP_MARKER = ".orbax-checkpoint-tmp"
DIGEST = "fmix32-sum-2x32-v1"  # the algorithm's name, stored with the digests
UNUSABLE_DIR = "checkpoints-unusable"  # beside checkpoints/: where a fallback moves a bad step


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the one-line message names the step and path."""


# --------------------------------------------------------------------------- digests


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: every input bit flips about half the output bits (uint32 wraps)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (8-byte dtypes gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def array_digest(x: jax.Array) -> jax.Array:
    """uint32[2] digest of ``x``'s values and positions, the same under any sharding."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    mixed = _fmix32(words ^ _fmix32(index + jnp.uint32(0x9E3779B9)))
    second = _fmix32(mixed + jnp.uint32(0x7F4A7C15))
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


@functools.cache
def _digest_fn(out_sharding):
    return jax.jit(lambda leaves: [array_digest(x) for x in leaves], out_shardings=out_sharding)


def tree_digests(tree: PyTree) -> dict[str, str]:
    """{leaf path: "dtype:16 hex digits"} of a tree of (possibly sharded, multi-process) arrays."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree), strict=True)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding)), None)
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    digests = jax.device_get(_digest_fn(replicated)(list(leaves)))  # tiny: 8 bytes per array
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): f"{x.dtype}:{int(d[0]):08x}{int(d[1]):08x}"
        for path, x, d in zip(paths, leaves, digests, strict=True)
    }


def _mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
    """Paths whose digest differs; a leaf restored under another dtype cannot be compared."""
    bad = []
    for path, digest in restored.items():
        old = saved.get(path)
        if old is not None and old.split(":")[0] == digest.split(":")[0] and old != digest:
            bad.append(path)
    return bad


# --------------------------------------------------------------------------- noise


def _mentions_checkpoint_io(*texts: str) -> bool:
    return any("orbax" in t or "tensorstore" in t or "Event loop is closed" in t for t in texts)


def _quiet_unraisable(previous):
    """``sys.unraisablehook`` without the exceptions Orbax's event loops and tensorstore's callbacks
    leave behind after a failed write or read (``Event loop is closed``, coroutines never awaited)."""

    def hook(unraisable) -> None:
        files = [frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback)]
        if not _mentions_checkpoint_io(str(unraisable.exc_value), repr(unraisable.object), *files):
            previous(unraisable)

    hook.shardlib_quiet = True
    return hook


class _AsyncioLeftovers(logging.Filter):
    """asyncio's "Task exception was never retrieved" for Orbax's write tasks, logged when they are
    garbage collected, possibly long after the CheckpointError (so this filter stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and _mentions_checkpoint_io(record.getMessage()))


_ASYNCIO_LEFTOVERS = _AsyncioLeftovers()


def _install_leftover_filters() -> None:
    """Idempotent, process-wide and narrow: only records that name Orbax or tensorstore are dropped."""
    logging.getLogger("asyncio").addFilter(_ASYNCIO_LEFTOVERS)  # a no-op when already there
    if not getattr(sys.unraisablehook, "shardlib_quiet", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


class _OrbaxErrors(logging.Filter):
    """Holds back absl ERROR records (Orbax logs one failure's traceback from several threads) while a
    Checkpointer is open: that failure is raised once, as a CheckpointError. Kept in ``held``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: collections.deque = collections.deque(maxlen=50)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.held.append(record.getMessage())
            return False
        return True

    def install(self) -> None:
        logging.getLogger("absl").addFilter(self)
        _install_leftover_filters()

    def remove(self) -> None:
        logging.getLogger("absl").removeFilter(self)


def _gist(err: BaseException, limit: int = 240) -> str:
    """One line about the innermost cause, its OS error first: Orbax wraps tensorstore errors that
    nest a few long paths and dump a whole spec."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split("\n", 1)[0].split(" See full TensorStore details", 1)[0].strip()
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if code := re.search(r"os_error_code='?(\d+)", str(err)):
        return f"{os.strerror(int(code.group(1)))}; {text}"
    return text


# --------------------------------------------------------------------------- checkpointer


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's handler of the arrays, with jax.Arrays saved one replica at a time.

    Orbax's default on CPU (replica-parallel saving, the default off GPUs)
    slices every replicated array into per-replica pieces with eager JAX ops,
    each compiled on first use: about 870 compiles, 3.5 s, on a process's
    first save of the tiny model on 8 devices (1.1 s without). The files are
    the same; only which device's copy is written changes. The other types
    keep Orbax's standard handlers.
    """
    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        *((ty, handlers.ScalarHandler()) for ty in (int, float, bytes, np.number)),
        (np.ndarray, handlers.NumpyHandler()),
        (str, handlers.StringHandler()),
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep``; async by default."""

    def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.every = every
        self._in_flight: int | None = None  # the step of a save started and not yet waited for
        self._closed = False
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()},
        )
        self.noise = _OrbaxErrors()  # removed again by close()
        self.noise.install()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def complete_steps(self) -> list[int]:
        """Complete steps as on disk (Orbax's own list forgets pruned-to-be steps when a save fails)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def incomplete_saves(self) -> list[pathlib.Path]:
        """Temporary directories of saves that never completed (a process killed mid-save)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def older_steps_text(self, step: int) -> str:
        older = [s for s in reversed(self.complete_steps()) if s < step]
        return f"older complete checkpoints: steps {', '.join(map(str, older))}" if older else "no older checkpoint"

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointError:
        newest = self.complete_steps()
        kept = f"step {newest[-1]} at {self.step_path(newest[-1])} is kept" if newest else "no complete checkpoint"
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(f"saving {what} in {self.directory} failed ({_gist(err)}); {kept}")

    def save(self, step: int, params: PyTree, opt_state: PyTree, meta: dict) -> None:
        """Starts saving ``step``. Returns once device data is copied to host;
        the write continues in the background (``wait`` to join it). Raises
        CheckpointError if this save, or the one still in flight, failed."""
        self.wait()
        state = {"params": params, "opt_state": opt_state}
        checksums = {"algorithm": DIGEST, "arrays": tree_digests(state)}
        try:
            self._in_flight = step
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state),
                    meta=ocp.args.JsonSave({"step": step, **meta, "checksums": checksums}),
                ),
            )
        except Exception as err:  # Orbax and tensorstore raise many types; the cause is kept
            self._in_flight = None
            raise self._save_failed(step, err) from err

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree) -> tuple[PyTree, PyTree, dict]:
        """Reads ``step`` onto the shardings the abstract targets carry, and verifies its checksums.

        Returns (params, opt_state, meta). Raises CheckpointError naming the
        step and path, and the older complete steps, when the files are
        unreadable, do not fit the target (another model config, a truncated
        write) or hold other bytes than were saved.
        """
        target = {"params": abstract_params, "opt_state": abstract_opt_state}
        where = f"checkpoint step {step} at {self.step_path(step)}"
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # Orbax and tensorstore raise many types; the cause is kept
            raise CheckpointError(
                f"{where} cannot be restored for this config and mesh ({_gist(err)}); {self.older_steps_text(step)}"
            ) from err
        state, meta = restored["state"], dict(restored["meta"])
        self._verify(step, meta.pop("checksums", None), state)
        return state["params"], state["opt_state"], meta

    def read_meta(self, step: int) -> dict:
        """The JSON item of ``step`` alone (what was recorded beside the arrays); CheckpointError if unreadable."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # as in restore: one line naming the step
            raise CheckpointError(
                f"checkpoint step {step} at {self.step_path(step)} has no readable meta ({_gist(err)}); "
                f"{self.older_steps_text(step)}"
            ) from err
        return dict(restored["meta"])

    def _verify(self, step: int, checksums: dict | None, state: PyTree) -> None:
        """Raises CheckpointError unless ``state`` has the digests saved with it (older checkpoints have none)."""
        if checksums is None or checksums.get("algorithm") != DIGEST:
            return
        if bad := _mismatches(checksums["arrays"], tree_digests(state)):
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise CheckpointError(
                f"checkpoint step {step} at {self.step_path(step)} fails its checksum ({bad[0]}{more} "
                f"differ from what was saved: the files are corrupt); {self.older_steps_text(step)}"
            )

    def set_aside(self, step: int) -> pathlib.Path:
        """Moves an unusable ``step`` out of Orbax's sight, never deleting it, so that the run can save
        that step again and pruning never reaches it. Returns where it went."""
        aside = self.directory.parent / UNUSABLE_DIR
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        destination = aside / f"{step}-{stamp}"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(self.step_path(step), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"shardlib-set-aside-{step}")
        self._manager.reload()
        return destination

    def wait(self) -> None:
        """Blocks until every started save is complete on disk; CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            step, self._in_flight = self._in_flight, None
            raise self._save_failed(step, err) from err
        self._in_flight = None

    def close(self) -> None:
        """Waits for the saves in flight, then releases the manager (also when a save failed)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            finally:
                self.noise.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Also on errors: a save already started holds a good step and must complete.
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as err:  # the error already on its way stays the one reported
            exc.add_note(str(err))


def restore_latest(
    checkpointer: Checkpointer, targets: Callable[[dict], tuple[PyTree, PyTree]], *, fallback: bool, log
) -> tuple[int, PyTree, PyTree, dict] | None:
    """(step, params, opt_state, meta) of the newest complete checkpoint, or None if there is none.

    ``targets(meta)``: the abstract (params, opt_state) to restore onto, given
    what the step recorded (its layout may ask for other shapes, see
    ``shardlib.training.state_layout``).

    A step that cannot be restored is an error (CheckpointError naming it and
    the older steps), unless ``fallback``: then the next older step is tried,
    and once one restores, the unusable newer ones are logged and moved to
    ``checkpoints-unusable/`` (never deleted), out of the way of the steps the
    run saves again. If none restores, nothing is moved and the newest one's
    error is raised.
    """
    steps = checkpointer.complete_steps()
    unusable: list[tuple[int, CheckpointError]] = []
    for step in reversed(steps):
        try:
            restored = step, *checkpointer.restore(step, *targets(checkpointer.read_meta(step)))
        except CheckpointError as err:
            if not fallback:
                hint = " (checkpoint.fallback=true resumes from an older one)" if step > steps[0] else ""
                raise CheckpointError(f"{err}{hint}") from err
            unusable.append((step, err))
            continue
        for bad, err in unusable:
            log(f"warning: {err}")
            log(f"checkpoint.fallback: resuming from step {step}; step {bad} moved to {checkpointer.set_aside(bad)}")
        return restored
    if unusable:
        step, err = unusable[0]
        raise CheckpointError(f"no checkpoint in {checkpointer.directory} restores; the newest: {err}") from err
    return None
