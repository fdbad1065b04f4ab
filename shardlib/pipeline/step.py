"""Loss and gradients of the transformer through a pipeline schedule.

Cuts the NNX transformer into the executor's pieces (embedding, chunks of the
layer stack, head + loss) and checks that the config fits the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import BlockWeights
from shardlib.config import Config
from shardlib.pipeline.executor import StageFunctions, pipeline_loss_and_grads
from shardlib.pipeline.plan import Plan, compile_plan
from shardlib.pipeline.schedules import make_schedule
from shardlib.train_state import AbstractModel

PyTree = Any


def pipeline_plan(cfg: Config, mesh: jax.sharding.Mesh) -> Plan:
    """The compiled schedule for ``cfg.pipeline`` on the mesh's ``pipe`` axis; clear errors if it cannot fit."""
    stages, pipe = mesh.shape["pipe"], cfg.pipeline
    if cfg.sharding != "dp":
        # XLA's SPMD partitioner aborts (spmd_partitioner_util.cc: "Check failed:
        # partition_group_list...") on parameters sharded over data or model inside
        # the partial-manual pipeline; until that is solved, refuse it clearly.
        raise ValueError(
            f"pipe={stages} works with sharding=dp for now (data parallelism beside the pipeline); "
            f"sharding={cfg.sharding} shards parameters over other axes, which the pipeline does not support yet"
        )
    chunks = stages * pipe.virtual_stages
    if cfg.model.n_layers % chunks:
        raise ValueError(
            f"model.n_layers={cfg.model.n_layers} does not divide into {chunks} pipeline chunks "
            f"(pipe={stages} x pipeline.virtual_stages={pipe.virtual_stages})"
        )
    if cfg.batch_size % pipe.microbatches:
        raise ValueError(f"batch_size={cfg.batch_size} does not divide into pipeline.microbatches={pipe.microbatches}")
    if cfg.grad_accum != 1:
        raise ValueError("grad_accum must be 1 with pipe > 1: the pipeline's microbatches accumulate gradients")
    return compile_plan(make_schedule(pipe.schedule, stages, pipe.microbatches, pipe.virtual_stages))


def resolve_branching(cfg: Config, mesh: jax.sharding.Mesh) -> str:
    """``cond`` unless XLA:CPU would run collectives inside stage-dependent branches."""
    if cfg.pipeline.branching != "auto":
        return cfg.pipeline.branching
    others = [axis for axis, size in mesh.shape.items() if axis != "pipe" and size > 1]
    return "select" if mesh.devices.flat[0].platform == "cpu" and others else "cond"


def make_pipeline_grads(
    model: AbstractModel, plan: Plan, mesh: jax.sharding.Mesh, shard: Callable | None, branching: str
) -> Callable[[PyTree, dict], tuple[jax.Array, PyTree]]:
    """``grads(params, batch) -> (loss, grads)`` for the transformer's params (pure dict with ``layers``)."""
    from shardlib.step import cross_entropy, split_microbatches  # shardlib.step imports this module

    kwargs = {"shard": shard} if shard is not None else {}
    m = plan.schedule.microbatches

    def merged(outer=None):
        # Each piece reads only some parameters (run_layers takes its weights as
        # an argument); placeholders keep the merged tree complete without
        # bringing the whole stack into every piece.
        tree = jax.tree.map(lambda a: jnp.zeros((1,), a.dtype), model.params)
        return nnx.merge(model.graphdef, {**tree, **(outer or {})})

    fns = StageFunctions(
        embed=lambda outer, tokens: merged(outer).embed_tokens(tokens, **kwargs),
        stage=lambda chunk, x: merged().run_layers(BlockWeights(**chunk), x, **kwargs),
        loss=lambda outer, x, targets: cross_entropy(merged(outer).logits(x, **kwargs), targets),
    )

    def grads_fn(params, batch):
        outer = {k: v for k, v in params.items() if k != "layers"}
        tokens = split_microbatches(batch["inputs"], m, shard)
        targets = split_microbatches(batch["targets"], m, shard)
        loss, layer_grads, outer_grads = pipeline_loss_and_grads(
            plan, fns, params["layers"], outer, tokens, targets, mesh, branching
        )
        return loss, {**outer_grads, "layers": layer_grads}

    return grads_fn
