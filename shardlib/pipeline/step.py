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
from jax.sharding import NamedSharding

from models.layers import BlockWeights
from shardlib.attention import AttentionPlan
from shardlib.config import Config
from shardlib.pipeline.executor import StageFunctions, pipeline_loss_and_grads
from shardlib.pipeline.plan import Plan, compile_plan
from shardlib.pipeline.schedules import make_schedule
from shardlib.rules import Rules, rule_axes, without_axes
from shardlib.sharding import ActivationSharding
from shardlib.train_state import AbstractModel

PyTree = Any


def pipeline_plan(cfg: Config, mesh: jax.sharding.Mesh) -> Plan:
    """The compiled schedule for ``cfg.pipeline`` on the mesh's ``pipe`` axis; clear errors if it cannot fit."""
    stages, pipe = mesh.shape["pipe"], cfg.pipeline
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


def resolve_branching(cfg: Config, mesh: jax.sharding.Mesh, rules: Rules) -> str:
    """``cond`` unless XLA:CPU would run collectives inside stage-dependent branches.

    Collectives over the manual axes (``pipe`` and the batch axes) sit outside
    the branches; only axes the partitioner handles (``model``, ``seq``) put
    collectives inside them.
    """
    if cfg.pipeline.branching != "auto":
        return cfg.pipeline.branching
    manual = {"pipe", *rule_axes(rules, "batch")}
    automatic = [axis for axis, size in mesh.shape.items() if axis not in manual and size > 1]
    return "select" if mesh.devices.flat[0].platform == "cpu" and automatic else "cond"


def make_pipeline_grads(
    model: AbstractModel,
    plan: Plan,
    mesh: jax.sharding.Mesh,
    shard: ActivationSharding | None,
    branching: str,
    param_specs: PyTree | None = None,
    attention: AttentionPlan | None = None,
) -> Callable[[PyTree, dict], tuple[jax.Array, PyTree, dict]]:
    """``grads(params, batch) -> (loss, grads, metrics)`` for the transformer's params (pure dict with ``layers``).

    The same contract as ``shardlib.step.make_grads_fn``; metrics are empty
    (the pipeline runs dense models only). ``param_specs``: each parameter's
    PartitionSpec (from the rules); the batch axes of ``shard``'s rules become
    manual inside the pipeline. Without ``shard`` and ``param_specs`` (one
    device), parameters are ``P("pipe")`` for the layers and replicated
    otherwise. ``attention``: the layers' attention (natural token order only).
    """
    from shardlib.step import cross_entropy, split_microbatches  # shardlib.step imports this module

    manual_batch = rule_axes(shard.rules, "batch") if shard is not None else ()
    kwargs = {"shard": ActivationSharding(without_axes(shard.rules, manual_batch), mesh)} if shard is not None else {}
    layer_kwargs = {**kwargs, "attention": attention.fn} if attention is not None else kwargs
    m = plan.schedule.microbatches

    def merged(outer=None):
        # Each piece reads only some parameters (run_layers takes its weights as
        # an argument); placeholders keep the merged tree complete without
        # bringing the whole stack into every piece.
        tree = jax.tree.map(lambda a: jnp.zeros((1,), a.dtype), model.params)
        return nnx.merge(model.graphdef, {**tree, **(outer or {})})

    fns = StageFunctions(
        embed=lambda outer, tokens: merged(outer).embed_tokens(tokens, **kwargs),
        stage=lambda chunk, x: merged().run_layers(BlockWeights(**chunk), x, **layer_kwargs),
        loss=lambda outer, x, targets: cross_entropy(merged(outer).logits(x, **kwargs), targets),
    )

    def grads_fn(params, batch):
        outer = {k: v for k, v in params.items() if k != "layers"}
        tokens = split_microbatches(batch["inputs"], m, shard)
        targets = split_microbatches(batch["targets"], m, shard)
        specs = param_specs or {}
        loss, layer_grads, outer_grads = pipeline_loss_and_grads(
            plan,
            fns,
            params["layers"],
            outer,
            tokens,
            targets,
            mesh,
            branching,
            layer_specs=specs.get("layers"),
            outer_specs={k: specs[k] for k in outer} if specs else None,
            batch_axes=manual_batch,
        )
        grads = {**outer_grads, "layers": layer_grads}
        if param_specs is not None:  # the shard_map's out_specs name only its manual axes
            grads = jax.tree.map(
                lambda g, spec: jax.lax.with_sharding_constraint(g, NamedSharding(mesh, spec)), grads, param_specs
            )
        return loss, grads, {}

    return grads_fn
