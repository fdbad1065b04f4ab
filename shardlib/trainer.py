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

from shardlib.attention import check_attention_fits, make_attention
from shardlib.checkpoint import Checkpointer
from shardlib.compression import make_grad_compression
from shardlib.config import Config, config_to_dict
from shardlib.data import BatchLoader, load_token_splits
from shardlib.experts import check_moe_fits
from shardlib.faults import NanGuard, StopSignals, check_run_dir, optimizer_for_policy
from shardlib.mesh import describe_mesh
from shardlib.metrics import MetricsWriter, mfu, peak_tflops, plot_loss_curve
from shardlib.pipeline.step import make_pipeline_grads, pipeline_plan, resolve_branching
from shardlib.rules import ShardingError, preset_rules
from shardlib.sharding import ActivationSharding
from shardlib.step import make_eval_step, make_grads_fn, make_train_step
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
    rules = preset_rules(cfg.sharding)
    model = abstract_model(cfg.model)
    tx = optimizer_for_policy(make_optimizer(cfg.optimizer, cfg.steps, model.logical_axes), cfg.faults)
    shardings = state_shardings(model, tx, rules, mesh)
    shard = ActivationSharding(rules, mesh)
    batch_sharding = _batch_sharding(cfg, shard)
    check_attention_fits(
        cfg.attention.impl, mesh, pipeline=mesh.shape["pipe"] > 1, grad_compression=cfg.grad_compression
    )
    attention = make_attention(
        cfg.attention.impl, cfg.attention.load_balance, shard, cfg.seq_len, cfg.attention.block_k
    )
    check_moe_fits(cfg, mesh)
    if mesh.shape["pipe"] > 1:
        plan = pipeline_plan(cfg, mesh)
        param_specs = jax.tree.map(lambda s: s.spec, shardings.params)
        branching = resolve_branching(cfg, mesh, rules)
        grads_fn = make_pipeline_grads(model, plan, mesh, shard, branching, param_specs, attention)
    else:
        grads_fn = make_grads_fn(model.graphdef, shard, cfg.grad_accum, attention)
    compression = make_grad_compression(
        cfg.grad_compression,
        graphdef=model.graphdef,
        params=model.params,
        param_shardings=shardings.params,
        rules=rules,
        mesh=mesh,
        batch_spec=batch_sharding.spec,
        grad_accum=cfg.grad_accum,
    )
    if compression is not None:  # the residuals join the optimizer state (and its checkpoints)
        tx, shardings = compression.wrap(tx, shardings)
    return TrainingSetup(
        cfg,
        mesh,
        model,
        tx,
        shardings,
        batch_sharding,
        make_train_step(grads_fn, tx, shardings, batch_sharding, compression),
        make_eval_step(model.graphdef, shardings, batch_sharding, shard, attention),
        jax.jit(lambda params, batch: grads_fn(params, batch)[:2]),  # (loss, grads), without metrics
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


def _restore_or_init(run: TrainingSetup, checkpointer: Checkpointer, log) -> tuple[int, object, object, dict]:
    """(start step, params, opt_state, meta) from the latest complete checkpoint, or fresh."""
    for partial in checkpointer.incomplete_saves():
        log(f"ignoring {partial}: a save that never completed (left as it is)")
    step = checkpointer.latest_step()
    if step is None:
        params, opt_state = run.init_state()
        return 0, params, opt_state, {"data_position": 0}
    params, opt_state, meta = checkpointer.restore(step, *abstract_state(run.model, run.tx, run.shardings))
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
    differs at most in ``run_dir``, reuses its compiled steps (several runs in
    one process, as in tests).

    SIGTERM or SIGINT ends the run after the step in flight, with a complete
    checkpoint (``TrainResult.stopped_by``); a non-finite loss is handled as
    ``cfg.faults`` says (``shardlib.faults``).
    """
    if setup is not None and (setup.mesh != mesh or setup.cfg.model_copy(update={"run_dir": cfg.run_dir}) != cfg):
        raise ValueError("train(setup=...) was built for another mesh or config (only run_dir may differ)")
    run = setup or setup_training(cfg, mesh)
    is_main = jax.process_index() == 0
    run_dir = pathlib.Path(cfg.run_dir)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
    train_tokens, heldout_tokens = load_token_splits(cfg.data)
    check_run_dir(run_dir, _checkpoint_bytes(run), cfg.checkpoint.keep, log=log)
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
    start_step, params, opt_state, meta = _restore_or_init(run, checkpointer, log)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))

    loader = run.loader(train_tokens, seed=cfg.seed, position=int(meta["data_position"]))
    eval_loader = run.loader(heldout_tokens, seed=cfg.seed + 1)
    throughput = _Throughput(cfg.batch_size * cfg.seq_len)
    flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
    peak = cfg.peak_tflops or peak_tflops(mesh.devices.flat[0].device_kind, cfg.model.compute_dtype)
    log(
        f"model {cfg.model.num_params():,} params | mesh {describe_mesh(mesh)} | sharding {cfg.sharding} | "
        f"steps {start_step + 1}..{end_step} of {cfg.steps} | {throughput.tokens_per_step:,} tokens/step"
    )

    nan_guard = NanGuard(
        cfg.faults,
        vocab_size=cfg.model.vocab_size,
        checkpoint_dir=checkpointer.directory,
        skipped=int(meta.get("skipped_updates", 0)),
        log=log,
    )
    losses: list[float] = []
    pending: list[dict] = []  # metrics fetched at log and save time: a fetch per step would stall dispatch
    eval_losses: list[tuple[int, float]] = []
    final_step = start_step
    started = time.perf_counter()
    steps = range(start_step + 1, end_step + 1)
    # Signals outermost: a SIGTERM while the last save completes must not kill it.
    with StopSignals() as stop, checkpointer, MetricsWriter(run_dir, enabled=is_main) as writer:
        bar = tqdm(steps, disable=not (progress and is_main), desc="train", unit="step")
        for step in bar:
            batch = nan_guard.inject(step, loader.next())
            params, opt_state, metrics = run.train_step(params, opt_state, batch)
            pending.append(metrics)
            throughput.step_done(metrics)
            final_step = step
            stopping = stop.requested(step)  # every step, on every process: they must agree
            last = step == end_step or stopping
            save = checkpointer.should_save(step) or last
            if step % cfg.log_every == 0 or save:
                # Also before every save, so that a non-finite step never reaches a checkpoint.
                losses += nan_guard.review(step - len(pending) + 1, pending)
                pending.clear()
            if step % cfg.log_every == 0 or last:
                # optax counts updates from 0, so step s used schedule(s - 1); skipped steps do not count.
                row = {
                    "loss": losses[-1],
                    "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(schedule(step - 1 - nan_guard.skipped)),
                }
                if nan_guard.skipped:
                    row["skipped_steps"] = nan_guard.skipped
                # The model's own metrics (MoE: aux and z losses, dropped-token fraction), last step.
                row |= {k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm")}
                row |= throughput.close_window()
                if "tokens_per_s" in row and (util := mfu(row["tokens_per_s"] / mesh.size, flops_per_token, peak)):
                    row["mfu"] = util
                writer.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}")
            if not stopping and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                eval_loss = _mean_eval_loss(run.eval_step, params, eval_loader, cfg.eval_batches)
                eval_losses.append((step, eval_loss))
                writer.write(step, {"loss": eval_loss}, split="eval")
                throughput.restart()
            if save:
                meta = {"data_position": loader.position, "skipped_updates": nan_guard.skipped}
                checkpointer.save(step, params, opt_state, meta)
            if stopping:
                break
        bar.close()
    wall = time.perf_counter() - started
    if is_main and losses:
        title = f"{cfg.model.name} on {describe_mesh(mesh)}"
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=title)
    if losses:
        rate = f", {throughput.overall:,.0f} tokens/s" if throughput.overall else ""
        log(f"steps {start_step + 1}..{final_step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, wall {wall:.1f}s{rate}")
    if stop.reason:
        log(
            f"stopped by {stop.reason} after step {final_step}; {checkpointer.step_path(final_step)} is "
            "complete: run the same command to resume"
        )
    return TrainResult(
        run_dir,
        start_step,
        final_step,
        losses,
        eval_losses,
        wall,
        throughput.overall,
        stop.reason,
        nan_guard.skipped,
    )
