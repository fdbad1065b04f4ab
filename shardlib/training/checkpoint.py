"""Sharded, asynchronous checkpoints with Orbax, verified on restore, with one-line errors.

Each checkpoint step holds two items: ``state`` (parameters and optimizer
state, written shard by shard by every process) and ``meta`` (JSON: step,
data-loader position, layout and a checksum of every array). Orbax writes a
step into a temporary directory and renames it only when complete, so
``latest_step`` never sees a partial save. A save cut short by a hard kill
leaves that temporary directory behind (``incomplete_saves``); it is never
restored from, and Orbax replaces it when the same step is saved again.
Restoring always goes through an abstract target that carries the current
mesh's shardings, which is what lets a run saved on 8 devices continue on 4.

Integrity (``shardlib.training.checkpoint_integrity`` says what each record
covers). Before the temporary directory is renamed, the primary process lists
every file of the step with its size and digest; ``restore`` checks that list,
then the meta, then reads the arrays in their stored dtypes and checks their
checksums. A step whose files, metadata or values differ from what was saved
is refused with one line naming the step, the file (or array) and the damage.

Errors. Every failure surfaces once, as a one-line :class:`CheckpointError`
that names the step and path, at the call that found it (``save``, ``wait``,
``close``, ``restore``); what Orbax and tensorstore log meanwhile is held back
(``shardlib.training.checkpoint_noise``). The step saved before a failed save
is never pruned, because Orbax prunes only after a save completes.
"""

from __future__ import annotations

import datetime
import pathlib
import shutil
from collections.abc import Callable
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from shardlib.training.checkpoint_integrity import (
    CHECKSUMS,
    HASHED_UP_TO,
    Damaged,
    cast_to,
    check_files,
    check_meta,
    checksums_record,
    mismatched_arrays,
    read_file_digests,
    stored_dtype_target,
    write_file_digests,
)
from shardlib.training.checkpoint_noise import OrbaxErrors, gist

PyTree = Any
# Orbax's suffix for a step directory that is still being written (0.12: "5.orbax-checkpoint-tmp").
TMP_MARKER = ".orbax-checkpoint-tmp"
UNUSABLE_DIR = "checkpoints-unusable"  # beside checkpoints/: where a fallback moves a bad step


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the one-line message names the step and path."""


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
        self.async_save = async_save
        self._in_flight: int | None = None  # the step of a save started and not yet waited for
        self._closed = False
        # Before the manager, which reads every step's metadata (and logs a damaged one's as an absl ERROR).
        self.noise = OrbaxErrors()  # removed again by close()
        self.noise.install()
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    # Always Orbax's asynchronous path, for its callback; a synchronous save waits at once.
                    enable_async_checkpointing=True,
                    async_options=ocp.AsyncOptions(post_finalization_callback=self._list_files),
                    create=True,
                ),
                item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()},
            )
        except BaseException:
            self.noise.remove()
            raise

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

    def _where(self, step: int) -> str:
        return f"checkpoint step {step} at {self.step_path(step)}"

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointError:
        newest = self.complete_steps()
        kept = f"step {newest[-1]} at {self.step_path(newest[-1])} is kept" if newest else "no complete checkpoint"
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(f"saving {what} in {self.directory} failed ({gist(err)}); {kept}")

    def save(self, step: int, params: PyTree, opt_state: PyTree, meta: dict) -> None:
        """Starts saving ``step``. Returns once device data is copied to host;
        the write continues in the background (``wait`` to join it) unless
        ``async_save`` is off. Raises CheckpointError if this save, or the one
        still in flight, failed."""
        self.wait()
        state = {"params": params, "opt_state": opt_state}
        record = {"step": step, **meta, CHECKSUMS: checksums_record(state)}
        try:
            self._in_flight = step
            self._manager.save(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(record))
            )
        except Exception as err:  # Orbax and tensorstore raise many types; the cause is kept
            self._in_flight = None
            raise self._save_failed(step, err) from err
        if not self.async_save:
            self.wait()

    def _list_files(self) -> None:
        """Orbax's post-finalisation callback: on the primary process, once every process's files of the
        step in flight are complete, before its temporary directory is renamed into place."""
        if self._in_flight is None:
            return
        pending = sorted(self.directory.glob(f"{self._in_flight}{TMP_MARKER}*"))
        write_file_digests(pending[-1] if pending else self.step_path(self._in_flight))

    def _checked_meta(self, step: int, log: Callable[[str], None] | None = None) -> tuple[dict, dict | None]:
        """(meta, listed files or None) of ``step`` once its files are as listed; CheckpointError if not.
        ``log`` gets a warning for a checkpoint older than what is checked."""
        step_dir = self.step_path(step)
        try:
            listed = read_file_digests(step_dir)
            check_files(step_dir, listed)
            try:
                meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            except Exception as err:  # Orbax and tensorstore raise many types; the cause is kept
                raise Damaged(f"meta/metadata cannot be read ({gist(err)})") from err
            unverified = check_meta(meta, listed)
        except Damaged as damage:
            raise self._damaged(step, damage) from damage
        if unverified and log is not None:
            log(f"warning: {self._where(step)} {unverified}")
        return meta, listed

    def _damaged(self, step: int, damage: Damaged) -> CheckpointError:
        return CheckpointError(f"{self._where(step)} is damaged: {damage}; {self.older_steps_text(step)}")

    def read_meta(self, step: int, log: Callable[[str], None] | None = None) -> dict:
        """The meta item of ``step`` (what was recorded beside the arrays, checksums included) once the step's
        files are checked; CheckpointError if they are damaged. ``log`` gets a warning for a checkpoint
        older than what is checked."""
        self.wait()
        return self._checked_meta(step, log)[0]

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree) -> tuple[PyTree, PyTree, dict]:
        """Reads ``step`` onto the shardings the abstract targets carry, verified.

        Returns (params, opt_state, meta). The step's files are checked against
        their list, the meta against what its version records, and the arrays,
        read in the dtypes they were stored in, against their checksums; then
        cast to the targets' dtypes. Raises CheckpointError naming the step and
        path, and the older complete steps, when a file is damaged (naming it
        and the damage), the files do not fit the target (another model
        config), or the values differ from what was saved.
        """
        self.wait()
        meta, listed = self._checked_meta(step)
        checksums = meta.pop(CHECKSUMS, None)
        target = {"params": abstract_params, "opt_state": abstract_opt_state}
        try:
            stored = stored_dtype_target(target, checksums)
        except Damaged as damage:
            raise self._damaged(step, damage) from damage
        try:
            misfit = _misfit(self._manager.metadata(step).item_metadata["state"], stored)
            if misfit is None:
                args = ocp.args.PyTreeRestore(stored, restore_args=ocp.checkpoint_utils.construct_restore_args(stored))
                state = self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as err:  # Orbax and tensorstore raise many types; the cause is kept
            raise self._unreadable(step, err, listed) from err
        if misfit is not None:
            raise CheckpointError(
                f"{self._where(step)} cannot be restored for this config and mesh ({misfit}); "
                f"{self.older_steps_text(step)}"
            )
        if checksums is not None and (bad := mismatched_arrays(checksums, state)):
            raise CheckpointError(
                f"{self._where(step)} fails its checksum ({_listing(bad)} from what was saved: "
                f"the files are corrupt); {self.older_steps_text(step)}"
            )
        state = cast_to(state, target)
        return state["params"], state["opt_state"], meta

    def _unreadable(self, step: int, err: BaseException, listed: dict | None) -> CheckpointError:
        """The error of a step that fits the target as far as Orbax's metadata tells, but that Orbax cannot
        restore: a data file damaged where only its size is listed, any file of a step older than file
        digests, or (every byte as saved) a config or mesh it was not saved for."""
        where, older = self._where(step), self.older_steps_text(step)
        unhashed = [name for name, record in (listed or {}).items() if "sha256" not in record]
        if listed is not None and not unhashed:  # every byte as saved: not damage
            return CheckpointError(f"{where} cannot be restored for this config and mesh ({gist(err)}); {older}")
        if listed is None:
            why = "its files are damaged, and it predates the file digests that would say which"
        elif len(unhashed) == 1:
            why = f"its data file {unhashed[0]}, listed by size only (over {HASHED_UP_TO >> 20} MiB), is damaged"
        else:
            listed_by_size = (
                f"{unhashed[0]} and {len(unhashed) - 1} more, listed by size only (over {HASHED_UP_TO >> 20} MiB)"
            )
            why = f"one of its data files {listed_by_size}, is damaged"
        return CheckpointError(f"{where} cannot be read ({gist(err)}): {why}; {older}")

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
        warnings: list[str] = []
        try:
            restored = step, *checkpointer.restore(step, *targets(checkpointer.read_meta(step, log=warnings.append)))
        except CheckpointError as err:
            if not fallback:
                hint = " (checkpoint.fallback=true resumes from an older one)" if step > steps[0] else ""
                raise CheckpointError(f"{err}{hint}") from err
            unusable.append((step, err))
            continue
        for bad, err in unusable:
            log(f"warning: {err}")
            log(f"checkpoint.fallback: resuming from step {step}; step {bad} moved to {checkpointer.set_aside(bad)}")
        for warning in warnings:
            log(warning)
        return restored
    if unusable:
        step, err = unusable[0]
        raise CheckpointError(f"no checkpoint in {checkpointer.directory} restores; the newest: {err}") from err
    return None


def _listing(paths: list[str]) -> str:
    return f"{paths[0]} differs" if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more differ"


def _misfit(saved: PyTree, target: PyTree) -> str | None:
    """What of ``target`` a step whose arrays Orbax describes as ``saved`` cannot fill (None: it fits)."""
    shapes = {_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    needed = {_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for name, shape in needed.items():
        if name not in shapes:
            return f"it holds no {name}"
        if shapes[name] != shape:
            return f"it holds {name} of shape {shapes[name]}, this run needs {shape}"
    if extra := sorted(shapes.keys() - needed.keys()):
        more = f" and {len(extra) - 1} more arrays" if len(extra) > 1 else ""
        return f"it holds {extra[0]}{more}, which this run has not"
    return None


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")
