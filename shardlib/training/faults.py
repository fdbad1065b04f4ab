"""What a training run does when something goes wrong, short of a lost peer (``shardlib.cluster.watchdog``).

* SIGTERM or SIGINT (preemption, Ctrl-C): :class:`StopSignals` lets the step in flight
  finish; the trainer then writes a checkpoint, waits for it and returns normally.
* A NaN or Inf loss: :class:`NanGuard` stops the run naming the step (``nan_policy: stop``)
  before any later state reaches a checkpoint, or counts the step while
  :func:`skip_nonfinite_updates` leaves parameters and optimizer state untouched on the
  device (``nan_policy: skip``).
* A finite divergence (a loss spike, or a state whose next step would be NaN):
  :class:`NanGuard` stops the run before that state reaches a checkpoint.
* A run directory that cannot hold a checkpoint: :func:`check_run_dir` fails at start.

Exit statuses of ``train.py`` for these cases are defined here.
"""

from __future__ import annotations

import collections
import math
import os
import pathlib
import shutil
import signal
import statistics
import threading
from collections.abc import Sequence
from typing import Self

import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from shardlib.core.units import format_bytes
from shardlib.training.config import FaultsConfig

EXIT_DIVERGED = 3
"""train.py's status when a non-finite loss stopped the run."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or Inf; the message names the step."""


class RunDirError(RuntimeError):
    """The run directory cannot be written, or cannot hold a checkpoint."""


# --------------------------------------------------------------------------- signals


def _preemption_service_running() -> bool:
    """True when JAX's preemption service catches SIGTERM for this multi-process run."""
    return (
        jax.process_count() > 1
        and jax.distributed.is_initialized()
        and bool(getattr(jax.config, "jax_enable_preemption_service", False))
    )


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at a step boundary.

    One process: the handlers set a flag that :meth:`requested` reports.
    Several processes must all save the same step, whichever of them got the
    signal. JAX's preemption service (installed by ``jax.distributed.initialize``)
    catches SIGTERM and agrees on that step; :meth:`requested` asks it, so it must
    be called at every step, by every process. SIGINT is re-sent as SIGTERM to
    join that protocol. A second SIGINT raises KeyboardInterrupt at once, for a
    user who will not wait for the checkpoint.

    Use as a context manager around the training loop; handlers are restored on
    exit. Outside the main thread (where Python cannot install handlers) it does
    nothing and :meth:`requested` stays False.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._shared = False
        self._interrupts = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._shared = _preemption_service_running()
        if not self._shared:
            self._install(signal.SIGTERM, self._on_sigterm)
        self._install(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _install(self, signum: int, handler) -> None:
        self._previous[signum] = signal.signal(signum, handler)

    def _on_sigterm(self, signum, frame) -> None:
        self.reason = self.reason or "SIGTERM"

    def _on_sigint(self, signum, frame) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        self.reason = self.reason or "SIGINT"
        if self._shared:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Whether to save ``step`` and stop; every process gets the same answer."""
        if self._shared:
            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = self.reason or "SIGTERM"  # to this process or to another one
                return True
            return False
        return self.reason is not None


# --------------------------------------------------------------------------- NaN and Inf


def skip_nonfinite_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, except that a step whose gradients are not all finite changes nothing.

    The updates are zero and the optimizer state (moments, step count) is kept, so the
    parameters stay those of the last good step. Unlike ``optax.apply_if_finite`` the
    state has exactly ``inner``'s structure, so a checkpoint restores under either
    ``nan_policy``. The test is on the global gradient norm, the number the trainer
    logs, so the host's count of skipped steps agrees with the device's decision.
    """

    def update(grads, state, params=None):
        updates, new_state = inner.update(grads, state, params)
        finite = jnp.isfinite(optax.tree.norm(grads))
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def optimizer_for_policy(tx: optax.GradientTransformation, cfg: FaultsConfig) -> optax.GradientTransformation:
    """``tx`` wrapped for ``cfg.nan_policy``: unchanged for ``stop``, skipping for ``skip``."""
    return skip_nonfinite_updates(tx) if cfg.nan_policy == "skip" else tx


class NanGuard:
    """Checks the losses and gradient norms of finished steps, on the host, in batches.

    The trainer hands it the metrics of the steps since its last check whenever it
    fetches them anyway (log steps), and before every checkpoint, so a bad step never
    reaches a checkpoint under ``nan_policy: stop`` without a fetch per step.

    Two kinds of bad step: a non-finite loss or gradient norm (handled as
    ``nan_policy`` says), and a finite loss spike, above ``spike_factor`` times the
    median of the last ``spike_window`` good losses (after ``spike_warmup`` of them),
    which always stops: a run that diverges on finite numbers (a far too high lr)
    fills its checkpoints with exploded weights long before any NaN shows.

    The loss of step s measures the parameters *before* update s, so the losses up to
    s cannot tell whether the state about to be saved at s is sound. The step also
    reports the norm of the parameters it made (``param_norm``): one that is not
    finite, or grew more than ``max_norm_growth`` times in one update, stops the run
    before that state reaches a checkpoint (with lr=1e6, update 2 multiplies the
    weights by ~1e5 while the losses of steps 1 and 2 are still normal).
    """

    def __init__(
        self,
        cfg: FaultsConfig,
        *,
        vocab_size: int,
        checkpoint_dir: pathlib.Path,
        skipped: int = 0,
        last_checkpoint: int | None = None,
        log=print,
    ):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.checkpoint_dir = checkpoint_dir
        self.skipped = skipped  # over the whole run: restored from the checkpoint
        self.in_a_row = 0
        self.last_checkpoint = last_checkpoint  # the newest checkpoint known to hold a sound state
        self.log = log
        self.recent: collections.deque[float] = collections.deque(maxlen=cfg.spike_window)
        self.last_norm: float | None = None  # parameter norm after the last reviewed update
        self._inject = frozenset(cfg.inject_nan_at)

    def inject(self, step: int, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """``batch``, or for a step in ``inject_nan_at`` one whose loss is NaN (rehearsal)."""
        if step not in self._inject:
            return batch
        tokens = batch["inputs"]
        # jnp.take's default "fill" mode turns an out-of-range id into a NaN embedding.
        poison = jax.jit(lambda t: jnp.full_like(t, self.vocab_size), out_shardings=tokens.sharding)
        return {**batch, "inputs": poison(tokens)}

    def saved(self, step: int) -> None:
        """Records that the state of ``step``, reviewed before the save, went into a checkpoint."""
        self.last_checkpoint = step

    def review(self, first_step: int, metrics: Sequence[dict[str, jax.Array]]) -> list[float]:
        """Losses of steps ``first_step, first_step + 1, ...``; raises TrainingDiverged per the policy."""
        fetched = jax.device_get([(m["loss"], m["grad_norm"], m["param_norm"]) for m in metrics])
        losses = []
        for step, (loss, grad_norm, param_norm) in enumerate(fetched, start=first_step):
            loss, grad_norm = float(loss), float(grad_norm)
            losses.append(loss)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._nonfinite(step, loss, grad_norm)
                continue
            self._check_state(step, float(param_norm))
            if (median := self._spike_median(loss)) is not None:
                spike = self._spike(f"loss {loss:.4g} at step {step}", median)
                raise TrainingDiverged(f"{spike}; stopped before saving it. {self._advice()}")
            self.in_a_row = 0
            self.recent.append(loss)
        return losses

    def _check_state(self, step: int, norm: float) -> None:
        """Raises TrainingDiverged unless the parameters update ``step`` made are sound (see the class)."""
        growth = self.cfg.max_norm_growth
        previous, self.last_norm = self.last_norm, norm
        where = f"the state after step {step} has parameter norm {norm:.4g}"
        if not math.isfinite(norm):
            why = where
        elif growth is not None and previous and norm > growth * previous:
            why = f"{where}, {norm / previous:.3g} x the norm one update before (faults.max_norm_growth={growth:g})"
        else:
            return
        raise TrainingDiverged(f"{why}; stopped before saving it. {self._advice()}")

    def _spike_median(self, loss: float) -> float | None:
        """The median ``loss`` exceeds ``spike_factor`` times, or None if it is no spike (or too early)."""
        if self.cfg.spike_factor is None or len(self.recent) < self.cfg.spike_warmup:
            return None
        median = statistics.median(self.recent)
        return median if loss > self.cfg.spike_factor * median else None

    def _spike(self, what: str, median: float) -> str:
        return (
            f"{what}, above {self.cfg.spike_factor:g} x {median:.4g}, the median loss of the "
            f"{len(self.recent)} steps before (faults.spike_factor, faults.spike_window)"
        )

    def _advice(self) -> str:
        """Where to resume from: every checkpoint this guard let through holds a sound state."""
        if self.last_checkpoint is None:
            good = f"{self.checkpoint_dir} holds no checkpoint of this run: start again"
        else:
            good = f"the last good checkpoint is {self.checkpoint_dir / str(self.last_checkpoint)}: resume from it"
        return f"{good} with a lower optimizer.lr"

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        """Stops (``nan_policy: stop``) or counts a skipped update, stopping after too many in a row."""
        what = f"loss {loss} and gradient norm {grad_norm} at step {step}"
        if self.cfg.nan_policy == "stop":
            raise TrainingDiverged(
                f"{what}; stopped before saving it (faults.nan_policy=stop). The checkpoints in "
                f"{self.checkpoint_dir} are all from earlier steps; {self._advice()} or faults.nan_policy=skip"
            )
        self.skipped += 1
        self.in_a_row += 1
        self.log(f"{what}: update skipped ({self.skipped} skipped in this run)")
        if self.in_a_row >= self.cfg.max_consecutive_skips:
            raise TrainingDiverged(
                f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
                f"(faults.max_consecutive_skips={self.cfg.max_consecutive_skips}); stopping. The "
                f"checkpoints in {self.checkpoint_dir} hold only the state of good steps"
            )


# --------------------------------------------------------------------------- run directory


def resume_advice(checkpoint_dir: pathlib.Path) -> str:
    """Where a run that lost a process resumes: its newest complete checkpoint (a step directory; one that
    is still being written carries Orbax's temporary suffix), for the line that reports the loss."""
    steps = sorted(int(p.name) for p in checkpoint_dir.glob("*") if p.name.isdigit() and p.is_dir())
    if not steps:
        return f"{checkpoint_dir} holds no complete checkpoint yet: restarting every process starts the run over"
    return f"the newest complete checkpoint is step {steps[-1]} ({checkpoint_dir / str(steps[-1])}): restart every process to resume from it"


def _free_bytes(path: pathlib.Path) -> int:
    return shutil.disk_usage(path).free


def check_run_dir(run_dir: pathlib.Path, checkpoint_bytes: int, keep: int, *, log=print) -> None:
    """Fails with RunDirError, before any compiling, if ``run_dir`` cannot take a checkpoint.

    Every process checks its own view of the directory (in a multi-host run, a filesystem
    every host mounts, where a mount can be missing or read-only on one of them): it creates
    ``run_dir/checkpoints``, writes and syncs a small probe file there, and compares the
    free space with its share of one checkpoint (``checkpoint_bytes``, the unpadded size
    of parameters and optimizer state, divided over the processes). Less room than
    ``keep + 1`` checkpoints is only a warning: compression may make them fit.
    """
    directory = run_dir / "checkpoints"
    probe = directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise RunDirError(f"run_dir {run_dir} cannot be written ({err.strerror or err}: {err.filename})") from err
    free = _free_bytes(directory)
    share = checkpoint_bytes // jax.process_count()
    if free < share:
        raise RunDirError(
            f"run_dir {run_dir} has {format_bytes(free)} free, but one checkpoint of this run needs about "
            f"{format_bytes(share)} here; free some space or pick another run_dir"
        )
    if free < (keep + 1) * share:
        log(
            f"warning: run_dir {run_dir} has {format_bytes(free)} free; keeping {keep} checkpoints of about "
            f"{format_bytes(share)} (one more while saving) may not fit"
        )
