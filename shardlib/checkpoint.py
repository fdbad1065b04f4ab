"""Sharded, asynchronous checkpoints with Orbax.

Each checkpoint step holds two items: ``state`` (parameters and optimizer
state, written shard by shard by every process) and ``meta`` (JSON: step and
data-loader position). Orbax writes a step into a temporary directory and
renames it only when complete, so ``latest_step`` never sees a partial save.
A save cut short by a hard kill leaves that temporary directory behind
(``incomplete_saves``); it is never restored from, and Orbax replaces it when
the same step is saved again.
Restoring always goes through an abstract target that carries the current
mesh's shardings, which is what lets a run saved on 8 devices continue on 4.
"""

from __future__ import annotations

import pathlib
from typing import Any, Self

import orbax.checkpoint as ocp

PyTree = Any
# Orbax's suffix for a step directory that is still being written (0.12: "5.orbax-checkpoint-tmp").
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; names the step and path."""


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep``; async by default."""

    def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def incomplete_saves(self) -> list[pathlib.Path]:
        """Temporary directories of saves that never completed (a process killed mid-save)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, params: PyTree, opt_state: PyTree, meta: dict) -> None:
        """Starts saving ``step``. Returns once device data is copied to host;
        the write continues in the background (``wait`` to join it)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                meta=ocp.args.JsonSave({"step": step, **meta}),
            ),
        )

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree) -> tuple[PyTree, PyTree, dict]:
        """Reads ``step`` onto the shardings the abstract targets carry.

        Returns (params, opt_state, meta). Raises CheckpointError naming the
        step and path when the files are unreadable or do not fit the target
        (another model config, a truncated write).
        """
        target = {"params": abstract_params, "opt_state": abstract_opt_state}
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # Orbax and tensorstore raise many types; the cause is kept
            raise CheckpointError(
                f"checkpoint step {step} at {self.step_path(step)} cannot be restored for this "
                f"config and mesh: {type(err).__name__}: {err}"
            ) from err
        state = restored["state"]
        return state["params"], state["opt_state"], dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        # Also on errors: a save already started holds a good step and must complete.
        self.close()
