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
    grads = jax.jit(
        lambda params, batch: loss_and_grads(loss_fn, params, batch, cfg.grad_accum, shard)
    )
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


def train(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Trains ``cfg`` on ``mesh`` up to ``cfg.steps``, resuming from ``cfg.run_dir`` if it holds checkpoints.

    Parameters and optimizer state are created (or restored) directly in
    their shards; the data position is restored with them, so an interrupted
    run continues with exactly the batches it would have seen.
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
    start_step = checkpointer.latest_step() or 0
    if start_step:
        params, opt_state, meta = checkpointer.restore(
            start_step, *abstract_state(run.model, run.tx, run.shardings)
        )
        position = int(meta["data_position"])
        log(f"resumed from {checkpointer.step_path(start_step)} (data position {position})")
    else:
        params, opt_state = run.init_state()
        position = 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))

    loader = run.loader(train_tokens, seed=cfg.seed, position=position)
    eval_loader = run.loader(heldout_tokens, seed=cfg.seed + 1)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
    device = mesh.devices.flat[0]
    peak = cfg.peak_tflops or peak_tflops(device.device_kind, cfg.model.compute_dtype)
    log(
        f"model {cfg.model.num_params():,} params | mesh {describe_mesh(mesh)} | sharding {cfg.sharding} | "
        f"steps {start_step + 1}..{cfg.steps} | {tokens_per_step:,} tokens/step"
    )

    losses: list[float] = []
    pending: list[
        jax.Array
    ] = []  # device scalars not yet fetched: fetching every step would stall dispatch
    eval_losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    window_start, window_steps, timed_tokens, timed_seconds = None, 0, 0, 0.0
    with MetricsWriter(run_dir, enabled=is_main) as writer:
        bar = tqdm(
            range(start_step + 1, cfg.steps + 1),
            disable=not (progress and is_main),
            desc="train",
            unit="step",
        )
        for step in bar:
            params, opt_state, metrics = run.train_step(params, opt_state, loader.next())
            pending.append(metrics["loss"])
            if window_start is None:  # the first step compiles: time from its end
                jax.block_until_ready(metrics["loss"])
                window_start = time.perf_counter()
            else:
                window_steps += 1
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                losses += [float(x) for x in pending]
                pending.clear()
                now = time.perf_counter()
                row = {
                    "loss": losses[-1],
                    "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(schedule(step - 1)),
                }  # optax counts updates from 0
                if window_steps:
                    seconds = now - window_start
                    timed_tokens += window_steps * tokens_per_step
                    timed_seconds += seconds
                    rate = window_steps * tokens_per_step / seconds
                    row |= {"step_time_s": seconds / window_steps, "tokens_per_s": rate}
                    utilisation = mfu(rate / mesh.size, flops_per_token, peak)
                    if utilisation is not None:
                        row["mfu"] = utilisation
                writer.write(step, row)
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}"
                )
                window_start, window_steps = time.perf_counter(), 0
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                eval_loss = _mean_eval_loss(run.eval_step, params, eval_loader, cfg.eval_batches)
                eval_losses.append((step, eval_loss))
                writer.write(step, {"loss": eval_loss}, split="eval")
                window_start = time.perf_counter()  # evaluation is not training time
            if checkpointer.should_save(step) or last:
                checkpointer.save(step, params, opt_state, {"data_position": loader.position})
        bar.close()
    checkpointer.close()
    losses += [float(x) for x in pending]
    wall = time.perf_counter() - started
    rate = timed_tokens / timed_seconds if timed_seconds else None
    if is_main and losses:
        plot_loss_curve(
            run_dir / "metrics.jsonl",
            run_dir / "loss.png",
            title=f"{cfg.model.name} on {describe_mesh(mesh)}",
        )
    if losses:
        log(
            f"steps {start_step + 1}..{cfg.steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"wall {wall:.1f}s" + (f", {rate:,.0f} tokens/s" if rate else "")
        )
    return TrainResult(
        run_dir, start_step, max(cfg.steps, start_step), losses, eval_losses, wall, rate
    )
