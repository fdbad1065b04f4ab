"""The training loop: sharded state, deterministic data, metrics, checkpoints.

``train(cfg, mesh)`` is what ``train.py`` calls; tests call it in-process.
Everything it needs comes in through its arguments: no global state is read.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from tqdm import tqdm

from shardlib.checkpoint import Checkpointer
from shardlib.config import Config, config_to_dict
from shardlib.data import BatchLoader, load_token_splits
from shardlib.mesh import describe_mesh, mesh_axis_sizes
from shardlib.metrics import MetricsWriter, mfu, peak_tflops, plot_loss_curve
from shardlib.rules import ShardingError, preset_rules
from shardlib.sharding import ActivationSharding
from shardlib.step import loss_and_grads, make_eval_step, make_loss_fn, make_train_step
from shardlib.train_state import (
    AbstractModel,
    StateShardings,
    abstract_model,
    abstract_state,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)


@dataclasses.dataclass
class TrainResult:
    """What one invocation of ``train`` did.

    losses: training loss of every step this invocation ran, in order.
    eval_losses: (step, held-out loss) pairs.
    """

    run_dir: pathlib.Path
    start_step: int
    final_step: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    wall_time_s: float
    tokens_per_second: float | None


def _check_mesh(mesh: jax.sharding.Mesh) -> None:
    if mesh_axis_sizes(mesh)["pipe"] > 1:
        raise ValueError(
            f"mesh {describe_mesh(mesh)} has pipe > 1, but the pipeline schedules are not "
            "implemented yet (issue #3); use a mesh with pipe: 1"
        )


def _batch_sharding(cfg: Config, shard: ActivationSharding) -> NamedSharding:
    """Sharding of the [batch, seq_len] token arrays; checks microbatches divide too."""
    micro = cfg.batch_size // cfg.grad_accum
    try:
        shard.spec((micro, cfg.seq_len), ("batch", "length"))
        spec = shard.spec((cfg.batch_size, cfg.seq_len), ("batch", "length"))
    except ShardingError as err:
        raise ValueError(
            f"batch_size={cfg.batch_size} with grad_accum={cfg.grad_accum} ({micro} sequences per "
            f"microbatch) and seq_len={cfg.seq_len} do not divide over the mesh: {err}"
        ) from err
    return NamedSharding(shard.mesh, spec)


def _mean_eval_loss(eval_fn, params, loader: BatchLoader, batches: int) -> float:
    losses = [eval_fn(params, loader.peek(i)) for i in range(batches)]
    return float(np.mean([float(x) for x in losses]))


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Everything static about a run on a mesh: shardings and the jitted steps.

    train_step(params, opt_state, batch) -> (params, opt_state, metrics)
    eval_step(params, batch) -> loss
    grads(params, batch) -> (loss, grads): the step's gradients, for tests and tools
    """

    cfg: Config
    mesh: jax.sharding.Mesh
    model: AbstractModel
    tx: optax.GradientTransformation
    shardings: StateShardings
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    grads: Callable

    def init_state(self):
        """Fresh (params, opt_state), created in their shards."""
        return init_state(self.cfg.model, self.cfg.seed, self.tx, self.shardings)

    def loader(self, tokens: np.ndarray, *, seed: int, position: int = 0) -> BatchLoader:
        return BatchLoader(
            tokens,
            self.cfg.batch_size,
            self.cfg.seq_len,
            self.batch_sharding,
            seed=seed,
            position=position,
        )


def setup_training(cfg: Config, mesh: jax.sharding.Mesh) -> TrainingSetup:
    """Resolves the rules on ``mesh`` and builds the jitted steps (compiled on first call)."""
    _check_mesh(mesh)
    rules = preset_rules(cfg.sharding)
    model = abstract_model(cfg.model)
    tx = make_optimizer(cfg.optimizer, cfg.steps, model.logical_axes)
    shardings = state_shardings(model, tx, rules, mesh)
    shard = ActivationSharding(rules, mesh)
    batch_sharding = _batch_sharding(cfg, shard)
    loss_fn = make_loss_fn(model.graphdef, shard)
    grads = jax.jit(lambda params, batch: loss_and_grads(loss_fn, params, batch, cfg.grad_accum, shard))
    return TrainingSetup(
        cfg,
        mesh,
        model,
        tx,
        shardings,
        batch_sharding,
        make_train_step(model.graphdef, tx, shardings, batch_sharding, shard, cfg.grad_accum),
        make_eval_step(model.graphdef, shardings, batch_sharding, shard),
        grads,
    )


class _Throughput:
    """Tokens per second over logging windows; excludes the compiling first step and evaluation."""

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


def _restore_or_init(run: TrainingSetup, checkpointer: Checkpointer, log) -> tuple[int, object, object, int]:
    """(start step, params, opt_state, data position) from the latest checkpoint, or fresh."""
    step = checkpointer.latest_step()
    if step is None:
        params, opt_state = run.init_state()
        return 0, params, opt_state, 0
    params, opt_state, meta = checkpointer.restore(step, *abstract_state(run.model, run.tx, run.shardings))
    position = int(meta["data_position"])
    log(f"resumed from {checkpointer.step_path(step)} (data position {position})")
    return step, params, opt_state, position


def train(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    *,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Trains ``cfg`` on ``mesh`` up to ``cfg.steps``, resuming from ``cfg.run_dir`` if it holds checkpoints.

    Parameters and optimizer state are created (or restored) directly in
    their shards; the data position is restored with them, so an interrupted
    run continues with exactly the batches it would have seen. ``stop_at``
    ends this invocation after that step, with a checkpoint, as a preempted
    job would; the learning-rate schedule stays the one of ``cfg.steps``.
    """
    run = setup_training(cfg, mesh)
    is_main = jax.process_index() == 0
    run_dir = pathlib.Path(cfg.run_dir)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
    train_tokens, heldout_tokens = load_token_splits(cfg.data)
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    end_step = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    if (done := checkpointer.latest_step() or 0) >= end_step:
        checkpointer.close()
        log(
            f"{run_dir} already holds step {done} of {cfg.steps}: nothing to train (raise steps or use another run_dir)"
        )
        return TrainResult(run_dir, done, done, [], [], 0.0, None)
    start_step, params, opt_state, position = _restore_or_init(run, checkpointer, log)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))

    loader = run.loader(train_tokens, seed=cfg.seed, position=position)
    eval_loader = run.loader(heldout_tokens, seed=cfg.seed + 1)
    throughput = _Throughput(cfg.batch_size * cfg.seq_len)
    flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
    peak = cfg.peak_tflops or peak_tflops(mesh.devices.flat[0].device_kind, cfg.model.compute_dtype)
    log(
        f"model {cfg.model.num_params():,} params | mesh {describe_mesh(mesh)} | sharding {cfg.sharding} | "
        f"steps {start_step + 1}..{end_step} of {cfg.steps} | {throughput.tokens_per_step:,} tokens/step"
    )

    losses: list[float] = []
    pending: list[jax.Array] = []  # fetched at log time: a fetch per step would stall dispatch
    eval_losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    steps = range(start_step + 1, end_step + 1)
    with MetricsWriter(run_dir, enabled=is_main) as writer:
        bar = tqdm(steps, disable=not (progress and is_main), desc="train", unit="step")
        for step in bar:
            params, opt_state, metrics = run.train_step(params, opt_state, loader.next())
            pending.append(metrics["loss"])
            throughput.step_done(metrics)
            last = step == end_step
            if step % cfg.log_every == 0 or last:
                losses += [float(x) for x in pending]
                pending.clear()
                # optax counts updates from 0, so step s used schedule(s - 1).
                row = {
                    "loss": losses[-1],
                    "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(schedule(step - 1)),
                }
                row |= throughput.close_window()
                if "tokens_per_s" in row and (util := mfu(row["tokens_per_s"] / mesh.size, flops_per_token, peak)):
                    row["mfu"] = util
                writer.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                eval_loss = _mean_eval_loss(run.eval_step, params, eval_loader, cfg.eval_batches)
                eval_losses.append((step, eval_loss))
                writer.write(step, {"loss": eval_loss}, split="eval")
                throughput.restart()
            if checkpointer.should_save(step) or last:
                checkpointer.save(step, params, opt_state, {"data_position": loader.position})
        bar.close()
    checkpointer.close()
    wall = time.perf_counter() - started
    if is_main and losses:
        title = f"{cfg.model.name} on {describe_mesh(mesh)}"
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=title)
    if losses:
        rate = f", {throughput.overall:,.0f} tokens/s" if throughput.overall else ""
        log(f"steps {start_step + 1}..{end_step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, wall {wall:.1f}s{rate}")
    return TrainResult(
        run_dir,
        start_step,
        max(end_step, start_step),
        losses,
        eval_losses,
        wall,
        throughput.overall,
    )
