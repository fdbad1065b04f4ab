"""The step loop of ``shardlib.training.trainer.train``: dispatch, review, log, evaluate, save.

Per step the host only dispatches work: the step's metrics stay on the device in
``pending`` until a log step or a save fetches them all at once (a fetch per step
would stall dispatch), and every check on them (``faults.NanGuard``) runs then.
Each thing a step may do is one method: :meth:`StepLoop._review`,
:meth:`StepLoop._log_row`, :meth:`StepLoop._maybe_eval`, :meth:`StepLoop._save`.

Under DiLoCo (``outer``) a step is the inner step, followed on every H-th
step by the outer step, dispatched the same way; a checkpoint of any step
holds the whole state (every replica's parameters and inner state, the
anchor and the outer momentum), so a run stopped mid-period resumes exactly.
The inner step's metrics are per replica and are reduced only when fetched.
Held-out evaluation scores the outer parameters (the anchor), never the
replicas mid-period.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from shardlib.training.checkpoint import Checkpointer
from shardlib.training.config import Config
from shardlib.training.data import BatchLoader
from shardlib.training.faults import NanGuard, StopSignals
from shardlib.training.metrics import MetricsWriter, mfu
from shardlib.training.prefetch import Prefetcher
from shardlib.training.setup import TrainingSetup
from shardlib.training.train_state import learning_rate_schedule

# XLA:CPU: how many dispatched steps may still be running when the host dispatches the next.
CPU_STEPS_IN_FLIGHT = 2


def steps_in_flight(mesh: jax.sharding.Mesh) -> int | None:
    """The bound on dispatched, unfinished steps the loop keeps (``DispatchWindow``): ``CPU_STEPS_IN_FLIGHT``
    on XLA:CPU with several devices, None (no bound: the host runs as far ahead as the runtime lets it)
    on one device and on every other backend.

    Why (jaxlib 0.10.2, ``bench/cpu_stall.py`` reproduces it): XLA:CPU launches each device's share of
    a program from one thread pool of max(cores, devices) threads, and a launch blocks its thread while
    that device already has its limit of computations in flight; an all-reduce holds one pool thread
    per device until every device has joined. With enough steps queued, launches blocked on the limit
    take the threads the last devices of a pending all-reduce need, and it never completes (XLA aborts
    after 40 s). A short queue keeps the launches from blocking; GPU and TPU queue on streams and keep
    their whole overlap.
    """
    return CPU_STEPS_IN_FLIGHT if mesh.devices.flat[0].platform == "cpu" and mesh.size > 1 else None


class DispatchWindow:
    """At most ``size`` dispatched steps unfinished (None: no bound; ``steps_in_flight``).

    ``admit()`` before dispatching a step waits until fewer than ``size`` are unfinished;
    ``dispatched(out)`` after it records one of the step's outputs (any array the step writes
    on every device, e.g. its metrics: not a donated one), whose readiness means the step is done.
    """

    def __init__(self, size: int | None):
        self.size = size
        self.unfinished: collections.deque = collections.deque()

    def admit(self) -> None:
        while self.size is not None and len(self.unfinished) >= self.size:
            jax.block_until_ready(self.unfinished.popleft())

    def dispatched(self, out) -> None:
        if self.size is not None:
            self.unfinished.append(out)


class Throughput:
    """Tokens per second over logging windows; excludes compiling and evaluation."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.window_start: float | None = None
        self.window_steps = 0
        self.tokens = 0
        self.seconds = 0.0

    def step_done(self, metrics: dict) -> None:
        if self.window_start is None:  # the first step compiled: start timing at its end
            jax.block_until_ready(metrics)
            self.restart()
        else:
            self.window_steps += 1

    def restart(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def close_window(self) -> dict[str, float]:
        """{step_time_s, tokens_per_s} of the steps since the last call (empty if none)."""
        if not self.window_steps:
            return {}
        seconds = time.perf_counter() - self.window_start
        tokens = self.window_steps * self.tokens_per_step
        self.tokens += tokens
        self.seconds += seconds
        out = {"step_time_s": seconds / self.window_steps, "tokens_per_s": tokens / seconds}
        self.restart()
        return out

    @property
    def overall(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


def mean_eval_loss(eval_fn: Callable, params, loader: BatchLoader, batches: int, *, wait: bool = False) -> float:
    """Mean held-out loss over the first ``batches`` (> 0) batches: the same ones at every evaluation.

    ``wait``: fetch each loss before the next batch is dispatched (XLA:CPU: ``steps_in_flight``).
    """
    losses = []
    for i in range(batches):
        loss = eval_fn(params, loader.peek(i))
        losses.append(float(loss) if wait else loss)
    return float(np.mean([float(x) for x in losses]))


MIN_BAR_COLUMNS = 40  # a narrower terminal (0 in some ptys) gets the console lines: a bar would show nothing


def console_line(step: int, total: int, row: dict | None, held_out: str | None, eta_s: float | None = None) -> str:
    """``step 10/300 | loss 4.5000 | held-out 4.5100 | 3,277 tokens/s | 1.25 s/step | ETA 6m02s``: what is known.

    ``held_out``: the formatted held-out loss (``held_out_text``); ``eta_s``: seconds left at the current pace.
    """
    parts = [f"step {step}/{total}"]
    if row is not None:
        parts.append(f"loss {row['loss']:.4f}")
    if held_out is not None:
        parts.append(held_out)
    if row is not None and "tokens_per_s" in row:
        parts += [f"{row['tokens_per_s']:,.0f} tokens/s", f"{row['step_time_s']:.3g} s/step"]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    if row is not None and row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} skipped")
    return " | ".join(parts)


def held_out_text(loss: float, anchor_step: int | None) -> str:
    """``held-out 4.5100``, under DiLoCo ``held-out 4.5100 (anchor of step 296)``: the network it scores."""
    return f"held-out {loss:.4f}" + (f" (anchor of step {anchor_step})" if anchor_step is not None else "")


def format_duration(seconds: float) -> str:
    """``42s``, ``6m02s``, ``2h05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def shows_a_bar(progress: bool, is_main: bool, stream=None) -> bool:
    """Whether the loop draws a progress bar on ``stream`` (stdout): only on a terminal at least
    ``MIN_BAR_COLUMNS`` wide; otherwise (a pipe, a file, a 0-column pty) it prints console lines."""
    stream = stream or sys.stdout
    if not (progress and is_main and stream.isatty()):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns >= MIN_BAR_COLUMNS
    except (OSError, ValueError):
        return False


def bar_safe(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log``, clearing a live progress bar first and redrawing it after, so a line never lands on the bar's."""

    def say(text: str) -> None:
        with tqdm.external_write_mode(file=sys.stdout):
            log(text)

    return say


@dataclasses.dataclass
class LoopState:
    """What changes from step to step, on the host: the state's handles and what was fetched."""

    params: object
    opt_state: object
    step: int  # the last step dispatched
    losses: list[float] = dataclasses.field(default_factory=list)  # fetched, of every step so far
    eval_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    pending: list[dict] = dataclasses.field(default_factory=list)  # metrics dispatched, not fetched yet
    last_metrics: dict = dataclasses.field(default_factory=dict)  # of the last step, on the device
    saves: int = 0


class StepLoop:
    """Runs steps of one invocation of ``train``; ``state`` holds the outcome.

    ``console``: print a line per logged step (no progress bar, or stdout not a
    terminal at least ``MIN_BAR_COLUMNS`` wide); ``bar``: show the tqdm progress bar on
    stdout instead, with the held-out losses as lines above it. ``log`` should be
    ``bar_safe`` (the trainer's is): a line then never lands on the bar's.
    """

    def __init__(
        self,
        cfg: Config,
        run: TrainingSetup,
        state: LoopState,
        *,
        loader: BatchLoader | Prefetcher,
        eval_loader: BatchLoader,
        guard: NanGuard,
        checkpointer: Checkpointer,
        writer: MetricsWriter,
        peak_tflops: float | None,
        log: Callable[[str], None],
        is_main: bool,
        progress: bool,
    ):
        self.cfg, self.run, self.state = cfg, run, state
        self.loader, self.eval_loader = loader, eval_loader
        self.guard, self.checkpointer, self.writer = guard, checkpointer, writer
        self.log, self.is_main = log, is_main
        self.bar = shows_a_bar(progress, is_main)
        self.console = is_main and not self.bar
        self.throughput = Throughput(cfg.batch_size * cfg.seq_len)
        self.flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self.peak = peak_tflops
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
        self.window = DispatchWindow(steps_in_flight(run.mesh))

    def run_steps(self, steps: range, stop: StopSignals) -> None:
        """Steps ``steps`` in order; after a requested stop, the one in flight ends the loop (saved)."""
        bar = tqdm(steps, disable=not self.bar, desc="train", unit="step", file=sys.stdout, dynamic_ncols=True)
        for step in bar:
            self._dispatch(step, first=step == steps[0])
            stopping = stop.requested(step)  # every step, on every process: they must agree
            last = step == steps[-1] or stopping
            save = self.checkpointer.should_save(step) or last
            # Step 1 too, so that the loss curve starts at the initial loss.
            logged = step % self.cfg.log_every == 0 or step == 1 or last
            if logged or save:
                # Also before every save, so that a bad step never reaches a checkpoint.
                self._review()
            row = self._log_row(step) if logged else None
            held_out = None if stopping else self._maybe_eval(step)
            if row is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}")
            if self.console and (row is not None or held_out is not None):
                eta = row["step_time_s"] * (steps[-1] - step) if row and "step_time_s" in row else None
                self.log(console_line(step, self.cfg.steps, row, held_out, eta))
            elif self.bar and held_out is not None:  # the bar shows the training loss; this, a line above it
                self.log(console_line(step, self.cfg.steps, None, held_out))
            if save:
                self._save(step)
            if stopping:
                break
        bar.close()

    def _dispatch(self, step: int, *, first: bool) -> None:
        """Starts ``step`` on the device; the first call compiles, and says so."""
        s = self.state
        batch = self.guard.inject(step, self.loader.next())
        if first and self.is_main:
            self.log("compiling the training step...")
        started = time.perf_counter()
        self.window.admit()
        s.params, s.opt_state, metrics = self.run.train_step_for(step)(s.params, s.opt_state, batch)
        if self.run.outer_due(step):  # DiLoCo: the period ends with the outer step
            s.params, s.opt_state = self.run.outer_step_after(step)(s.params, s.opt_state)
        if first and self.is_main:  # jit compiles synchronously, then dispatches
            self.log(f"compiled in {time.perf_counter() - started:.1f} s")
        s.pending.append(metrics)
        s.last_metrics = metrics
        self.window.dispatched(metrics)
        self.throughput.step_done(metrics)
        s.step = step

    def _review(self) -> None:
        """Fetches the pending metrics, all at once, and has the guard check them."""
        s = self.state
        pending = self.run.scalar_metrics(s.pending)
        s.losses += self.guard.review(s.step - len(s.pending) + 1, pending)
        s.pending.clear()

    def _log_row(self, step: int) -> dict:
        """Writes the train row of ``step`` (just reviewed) and returns it."""
        (metrics,) = self.run.scalar_metrics([self.state.last_metrics])
        # optax counts updates from 0, so step s used schedule(s - 1); skipped steps do not count.
        row = {
            "loss": self.state.losses[-1],
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(self.schedule(step - 1 - self.guard.skipped)),
        }
        if self.guard.skipped:
            row["skipped_steps"] = self.guard.skipped
        # The model's own metrics (MoE: aux and z losses, dropped-token fraction), last step.
        row |= {k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm")}
        row |= self.throughput.close_window()
        if "tokens_per_s" in row:
            per_device = row["tokens_per_s"] / self.run.mesh.size
            if util := mfu(per_device, self.flops_per_token, self.peak):
                row["mfu"] = util
        self.writer.write(step, row)
        return row

    def _maybe_eval(self, step: int) -> str | None:
        """The held-out loss, at every ``eval_every``-th step and the run's last; never with ``eval_batches: 0``.

        It scores ``TrainingSetup.evaluated``: under DiLoCo the anchor, whose eval row in metrics.jsonl
        carries ``anchor_step`` (``TrainingSetup.anchor_step``). Returns the console's text for it.
        """
        cfg, s = self.cfg, self.state
        due = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        if not (due and cfg.eval_batches):
            return None
        network = self.run.evaluated(s.params, s.opt_state)
        eval_loss = mean_eval_loss(
            self.run.eval_step, network, self.eval_loader, cfg.eval_batches, wait=self.window.size is not None
        )
        s.eval_losses.append((step, eval_loss))
        anchor_step = self.run.anchor_step(step)
        row = {"loss": eval_loss} | ({"anchor_step": anchor_step} if anchor_step is not None else {})
        self.writer.write(step, row, split="eval")
        self.throughput.restart()
        return held_out_text(eval_loss, anchor_step)

    def _save(self, step: int) -> None:
        """Starts the checkpoint of ``step`` (async); its state was reviewed just before (``NanGuard``)."""
        s = self.state
        meta = {"data_position": self.loader.position, "skipped_updates": self.guard.skipped}
        meta |= self.run.checkpoint_layout()  # layer order, residuals' mesh: what a restore elsewhere needs
        self.checkpointer.save(step, s.params, s.opt_state, meta)
        self.guard.saved(step)
        s.saves += 1
