"""The training loop: sharded state, deterministic data, metrics, checkpoints.

``train(cfg, mesh)`` is what ``train.py`` calls; tests call it in-process.
Everything it needs comes in through its arguments: no global state is read.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable

import jax

from shardlib.core.mesh import describe_mesh
from shardlib.interop.init_from import initial_state
from shardlib.training.checkpoint import Checkpointer, restore_latest
from shardlib.training.config import Config
from shardlib.training.data import check_token_ids, load_token_splits
from shardlib.training.faults import NanGuard, StopSignals, check_run_dir
from shardlib.training.loop import LoopState, StepLoop, bar_safe
from shardlib.training.metrics import METRICS_FILE, TB_DIR, MetricsWriter, peak_tflops, plot_loss_curve
from shardlib.training.prefetch import Prefetcher
from shardlib.training.run_guard import check_resume, record_start
from shardlib.training.setup import TrainingSetup, setup_training
from shardlib.training.state_layout import adapt_restored, fuse_restored, reset_foreign_residuals, restore_targets
from shardlib.training.train_state import abstract_state

PREFETCH = 2  # batches read ahead while a step runs: the next step's, and one more for a slow read


@dataclasses.dataclass
class TrainResult:
    """What one invocation of ``train`` did.

    losses: training loss of every step this invocation ran, in order (NaN for a skipped step).
    eval_losses: (step, held-out loss) pairs.
    """

    run_dir: pathlib.Path
    start_step: int
    final_step: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    wall_time_s: float
    tokens_per_second: float | None
    stopped_by: str | None = None  # the signal that ended this invocation early, if one did
    skipped_steps: int = 0  # updates skipped for a non-finite loss (nan_policy=skip), whole run


def _restore_or_init(
    run: TrainingSetup, checkpointer: Checkpointer, log, *, fallback: bool = False
) -> tuple[int, object, object, dict]:
    """(start step, params, opt_state, meta) from the latest complete checkpoint, or fresh.

    ``fallback`` (checkpoint.fallback): an unusable newest checkpoint is set aside for an older one.
    """
    for partial in checkpointer.incomplete_saves():
        log(f"ignoring {partial}: a save that never completed (left as it is)")
    targets = abstract_state(run.model, run.tx, run.shardings)
    restored = restore_latest(
        checkpointer, lambda meta: restore_targets(*targets, meta, run.compression), fallback=fallback, log=log
    )
    if restored is None:
        params, opt_state = initial_state(run, log)  # cfg.init_from's weights, else random (shardlib.interop)
        return 0, params, opt_state, {"data_position": 0}
    step, params, opt_state, meta = restored
    # The state in this plan's layout: the layers in its pipeline's order, residuals of its own mesh,
    # the projections fused (a checkpoint from before the fusion is converted).
    opt_state = reset_foreign_residuals(opt_state, meta, run.compression, log)
    params, opt_state = fuse_restored(params, opt_state, meta, log)
    params, opt_state = adapt_restored(params, opt_state, meta, layer_order=run.plan.layer_order, tx=run.tx, log=log)
    log(f"resumed from {checkpointer.step_path(step)} (data position {meta['data_position']})")
    return step, params, opt_state, meta


def _checkpoint_bytes(run: TrainingSetup) -> int:
    """Unpadded bytes of parameters and optimizer state: what one checkpoint holds, before compression."""
    leaves = jax.tree.leaves(abstract_state(run.model, run.tx, run.shardings))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


def train(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    *,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    setup: TrainingSetup | None = None,
) -> TrainResult:
    """Trains ``cfg`` on ``mesh`` up to ``cfg.steps``, resuming from ``cfg.run_dir`` if it holds checkpoints.

    Parameters and optimizer state are created (or restored) directly in
    their shards; the data position is restored with them, so an interrupted
    run continues with exactly the batches it would have seen. ``stop_at``
    ends this invocation after that step, with a checkpoint, as a preempted
    job would; the learning-rate schedule stays the one of ``cfg.steps``.
    ``setup``, from ``setup_training`` for the same mesh and a config that
    differs at most in what only the loop reads (``_LOOP_ONLY``), reuses its
    compiled steps (several runs in one process, as in tests).

    SIGTERM or SIGINT ends the run after the step in flight, with a complete
    checkpoint (``TrainResult.stopped_by``); a non-finite loss, a loss spike or
    a state that would diverge is handled as ``cfg.faults`` says
    (``shardlib.training.faults.NanGuard``). Without a progress bar (``progress=False``
    or stdout not a terminal at least ``loop.MIN_BAR_COLUMNS`` wide) every logged step is also a line
    through ``log``, with its ETA; with a bar, the held-out losses are. The last line says where the
    run's outputs are.
    """
    _check_setup(setup, cfg, mesh)
    log = bar_safe(log)  # a line never lands on the progress bar's
    train_tokens, heldout_tokens = _load_tokens(cfg)
    run = setup or setup_training(cfg, mesh)
    is_main = jax.process_index() == 0
    run_dir = pathlib.Path(cfg.run_dir)
    checkpointer = _open_checkpoints(cfg, run, run_dir, log)
    end_step = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    if (done := checkpointer.latest_step() or 0) >= end_step:
        checkpointer.close()
        log(
            f"{run_dir} already holds step {done} of {cfg.steps}: nothing to train (raise steps or use another run_dir)"
        )
        return TrainResult(run_dir, done, done, [], [], 0.0, None)
    try:
        start_step, params, opt_state, meta = _restore_or_init(run, checkpointer, log, fallback=cfg.checkpoint.fallback)
    except BaseException:  # an unusable checkpoint or import: leave no manager (or its log filter) behind
        checkpointer.close()
        raise
    if is_main:
        record_start(run_dir, cfg, start_step)  # config.json and config-history.jsonl (shardlib.training.run_guard)
    guard = _nan_guard(cfg, checkpointer, meta, start_step, log)
    state = LoopState(params, opt_state, start_step)
    log(_banner(cfg, mesh, start_step, end_step))
    started = time.perf_counter()
    # Signals outermost: a SIGTERM while the last save completes must not kill it.
    # The next batches are read while a step runs (shardlib.training.prefetch).
    batches = Prefetcher(run.loader(train_tokens, seed=cfg.seed, position=int(meta["data_position"])), PREFETCH)
    with StopSignals() as stop, checkpointer, MetricsWriter(run_dir, enabled=is_main) as writer, batches:
        loop = StepLoop(
            cfg,
            run,
            state,
            loader=batches,
            eval_loader=run.loader(heldout_tokens, seed=cfg.seed + 1),
            guard=guard,
            checkpointer=checkpointer,
            writer=writer,
            peak_tflops=cfg.peak_tflops or peak_tflops(mesh.devices.flat[0].device_kind, cfg.model.compute_dtype),
            log=log,
            is_main=is_main,
            progress=progress,
        )
        loop.run_steps(range(start_step + 1, end_step + 1), stop)
    elapsed = time.perf_counter() - started
    result = TrainResult(
        run_dir, start_step, state.step, state.losses, state.eval_losses, elapsed, loop.throughput.overall,
        stop.reason, guard.skipped,
    )  # fmt: skip
    _summarise(result, cfg, mesh, checkpointer, log, plot=is_main)
    return result


def _load_tokens(cfg: Config):
    """(train, held-out) token arrays of ``cfg.data``, checked against the model's vocabulary."""
    train_tokens, heldout_tokens = load_token_splits(cfg.data)
    check_token_ids(cfg.data, cfg.model.vocab_size, {"train": train_tokens, "held-out": heldout_tokens})
    return train_tokens, heldout_tokens


def _open_checkpoints(cfg: Config, run: TrainingSetup, run_dir: pathlib.Path, log) -> Checkpointer:
    """The run's checkpoint manager, after the checks that must precede it.

    The resume guard comes first, so a mismatched start touches nothing; then the disk check.
    """
    check_resume(run_dir, cfg)
    check_run_dir(run_dir, _checkpoint_bytes(run), cfg.checkpoint.keep, log=log)
    return Checkpointer(
        run_dir / "checkpoints",
        every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )


def _nan_guard(cfg: Config, checkpointer: Checkpointer, meta: dict, start_step: int, log) -> NanGuard:
    """The fault policy of ``cfg.faults``, carrying the skip count a resumed run had reached."""
    return NanGuard(
        cfg.faults,
        vocab_size=cfg.model.vocab_size,
        checkpoint_dir=checkpointer.directory,
        skipped=int(meta.get("skipped_updates", 0)),
        last_checkpoint=start_step or None,
        log=log,
    )


def _banner(cfg: Config, mesh: jax.sharding.Mesh, start_step: int, end_step: int) -> str:
    return (
        f"model {cfg.model.num_params():,} params | mesh {describe_mesh(mesh)} | sharding {cfg.sharding} | "
        f"steps {start_step + 1}..{end_step} of {cfg.steps} | {cfg.batch_size * cfg.seq_len:,} tokens/step"
    )


# Config keys only the step loop reads: a setup built for one value serves them all.
_LOOP_ONLY = ("run_dir", "log_every", "eval_every", "eval_batches", "checkpoint")


def _check_setup(setup: TrainingSetup | None, cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """Refuses a ``setup`` whose compiled steps belong to another mesh or config."""
    if setup is None:
        return
    same_steps = setup.cfg.model_copy(update={key: getattr(cfg, key) for key in _LOOP_ONLY}) == cfg
    if setup.mesh != mesh or not same_steps:
        raise ValueError(
            f"train(setup=...) was built for another mesh or config (only {', '.join(_LOOP_ONLY)} may differ)"
        )


def _summarise(
    result: TrainResult, cfg: Config, mesh: jax.sharding.Mesh, checkpointer: Checkpointer, log, *, plot: bool
) -> None:
    """The run's last lines: loss and throughput, how it stopped, where its outputs are; and its loss curve."""
    if plot and result.losses:
        plot_loss_curve(result.run_dir / "metrics.jsonl", result.run_dir / "loss.png", title=run_title(cfg, mesh))
    if result.losses:
        first, last = result.start_step + 1, result.final_step
        rate = f", {result.tokens_per_second:,.0f} tokens/s" if result.tokens_per_second else ""
        log(
            f"steps {first}..{last}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
            f"wall {result.wall_time_s:.1f}s{rate}"
        )
    if result.stopped_by:
        log(
            f"stopped by {result.stopped_by} after step {result.final_step}; "
            f"{checkpointer.step_path(result.final_step)} is complete: run the same command to resume"
        )
    log(_outputs_line(result.run_dir, checkpointer, written_here=plot and bool(result.losses)))


def _outputs_line(run_dir: pathlib.Path, checkpointer: Checkpointer, *, written_here: bool) -> str:
    """``outputs in runs/tiny: metrics.jsonl, tb/ (TensorBoard), loss.png, config.json, checkpoints/300``."""
    steps = checkpointer.complete_steps()
    saved = f"checkpoints/{steps[-1]}" if steps else "no checkpoint"
    if not written_here:  # not process 0, or nothing trained: only checkpoints are this process's
        return f"outputs in {run_dir}: {saved}"
    return f"outputs in {run_dir}: {METRICS_FILE}, {TB_DIR}/ (TensorBoard), loss.png, config.json, {saved}"


def run_title(cfg: Config, mesh: jax.sharding.Mesh) -> str:
    """What a run's loss.png is of, in three lines: ``runs/tiny``, ``853K-parameter transformer, tp on data=4 x
    model=2 (8 cpu devices)``, ``300 steps of 32 x 128 tokens, lr 0.003`` (and DiLoCo's period)."""
    params = cfg.model.num_params()
    size = (
        f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"
    )
    axes = " x ".join(f"{name}={n}" for name, n in mesh.shape.items() if n > 1) or "one device"
    schedule = f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.optimizer.lr:g}"
    if cfg.outer.algorithm != "none":
        schedule += (
            f"; {cfg.outer.algorithm} every {cfg.outer.inner_steps} steps over {', '.join(cfg.outer.replica_axes)}"
        )
    platform = mesh.devices.flat[0].platform
    return "\n".join(
        [
            cfg.run_dir,
            f"{size}-parameter transformer, {cfg.sharding} on {axes} ({mesh.size} {platform} devices)",
            schedule,
        ]
    )
