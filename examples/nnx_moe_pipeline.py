"""The NNX mixture-of-experts model of ``examples/nnx_moe.py``, experts split over ``ep``, inside a 1F1B pipeline.

    python -m examples.nnx_moe_pipeline        # from the repository root

The model is ``examples.nnx_moe.MoEDecoder`` unchanged: its blocks stacked with
``nnx.vmap``, each block's MoE layer calling ``moe_dispatch`` with its own GELU
experts. The mesh is the project's own, ``dp`` 2 x ``stage`` 2 x ``ep`` 2, with
shardlib's ``dp`` preset renamed onto it (``data -> dp``, ``pipe -> stage``,
``expert -> ep``): the stacked layers over ``stage`` (one per stage), the experts
over ``ep``, the rows of every microbatch over ``dp`` x ``ep``.

Through the public API only: ``split_stacked`` cuts the params into the stack
and the rest, ``stacked_stage_functions`` makes the stage functions from the
model's own ``apply_block`` (the embedding and the head are the model's
``embed`` and ``final_norm`` modules), ``plan_pipeline`` compiles the 1F1B table
and ``pipeline_loss_and_grads`` runs it with the rules' specs for the params
(the experts ``P("stage", "ep")``, owned by ``ep``: neither gathered nor reduced
over it) and the token axes ``dp`` and ``ep`` manual, so each block's
``moe_dispatch`` runs its per-device body: one all-to-all over ``ep`` out and
one back per MoE layer and microbatch, inside the stage.

The router's load-balancing and z losses ride in the activation pytree
(``{"x_BxLxD", "router_loss_B"}``): each layer adds its weighted losses (the
same value on every row; they are means over the microbatch's tokens on every
device) and the loss head adds the rows' mean to the cross-entropy. Why there
and not in ``StageFunctions.stats``: statistics are values only (backward
passes take the activation alone), so a loss must reach the gradients through
the activation anyway; a ``[B]`` leaf does that with no custom VJP, passes
between stages like any other, and its cotangent flows back to each layer's
router.

The objective is the microbatched one, as every pipeline's is: the mean over
the microbatches of (cross-entropy + router loss), the router's losses taken on
each microbatch's tokens. Two AdamW steps run there and then, from the same
start, on one device (the same model and loss on a mesh of one, microbatch by
microbatch): the loss and every gradient of both steps must agree within 1e-5
of each leaf's scale. It prints both runs' losses, the largest differences, the
all-to-alls of the compiled pipelined step (one device's: none) and where the
experts' gradients live. Measured (8 emulated CPU devices, jax 0.10.2): losses
within 1.1e-7, gradients within 1.2e-6 of one device; 12 all-to-alls in the
pipelined step, every one over the ``ep`` pairs ({{0,1},{2,3},{4,5},{6,7}}):
on CPU the stages' branches are ``select``ed, so each branch 1F1B uses is traced
once (two forwards with one layer's two, two backwards with the recomputed
forward's two and their transposes); none in the one-device step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import shardlib
from examples.foreign_models import cross_entropy, max_relative_error
from examples.nnx_moe import (
    ALIASES,
    AUX_WEIGHT,
    LENGTH,
    N_EXPERTS,
    N_LAYERS,
    TOLERANCE,
    TX,
    VOCAB,
    Z_WEIGHT,
    apply_block,
    build,
)
from shardlib.parallel.experts import expert_axes

MESH = {"dp": 2, "stage": 2, "ep": 2}
MICROBATCHES, BATCH = 4, 16  # 4 rows per microbatch: one per token shard (dp x ep)
STEPS = 2
SETTINGS = shardlib.PipelineSettings("1f1b", MICROBATCHES)


def project_mesh(devices: Sequence[jax.Device], sizes: dict[str, int]) -> jax.sharding.Mesh:
    count = int(np.prod(list(sizes.values())))
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * 3, devices=devices[:count])


def project_rules(mesh: jax.sharding.Mesh) -> shardlib.Rules:
    """shardlib's dp preset on the project's (dp, stage, ep) mesh, with the model's names as aliases."""
    renamed = {"data": "dp", "pipe": "stage", "expert": "ep"}
    return shardlib.alias_logical_axes(shardlib.preset_rules("dp", mesh=mesh, mesh_axes=renamed), ALIASES)


def batches() -> list[np.ndarray]:
    """Each step's tokens, [M, B/M, L]: the pipeline's microbatches (and the reference's)."""
    rng = np.random.default_rng(0)
    shape = (MICROBATCHES, BATCH // MICROBATCHES, LENGTH)
    return [rng.integers(0, VOCAB, shape, dtype=np.int32) for _ in range(STEPS)]


def weighted_router_loss(stats) -> jax.Array:
    """One MoE layer's share of the objective: the model's router loss is the mean over its layers."""
    return (AUX_WEIGHT * stats.aux_loss + Z_WEIGHT * stats.z_loss) / N_LAYERS


def stage_functions(model: nnx.Module, shard: shardlib.ActivationSharding) -> shardlib.StageFunctions:
    """The executor's pieces from the model's own modules; the activation is {x_BxLxD, router_loss_B}."""
    block_def = nnx.graphdef(model.blocks)
    embed_def, norm_def = nnx.graphdef(model.embed), nnx.graphdef(model.final_norm)

    def embed(outer, mb):
        x_BxLxD = nnx.merge(embed_def, outer["embed"])(mb["tokens"])
        return {"x_BxLxD": x_BxLxD, "router_loss_B": jnp.zeros(x_BxLxD.shape[:1], jnp.float32)}

    def layer(block_params, carry):
        y_BxLxD, stats = apply_block(block_def, block_params, carry["x_BxLxD"], shard)
        return {"x_BxLxD": y_BxLxD, "router_loss_B": carry["router_loss_B"] + weighted_router_loss(stats)}

    def loss(outer, carry, mb):
        token_embed = nnx.merge(embed_def, outer["embed"])
        logits = token_embed.attend(nnx.merge(norm_def, outer["final_norm"])(carry["x_BxLxD"]))
        return cross_entropy(logits, mb["tokens"]) + jnp.mean(carry["router_loss_B"])

    return shardlib.stacked_stage_functions(embed, layer, loss)


def batch_axes(shard: shardlib.ActivationSharding, rows: int) -> tuple[str, ...]:
    """The mesh axes the rules split a microbatch's rows over (``batch``: ``dp`` x ``ep`` here)."""
    entry = shard.spec((rows,), ("batch",))[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def specs(shardings: Any) -> Any:
    return jax.tree.map(lambda s: s.spec, shardings)


@dataclasses.dataclass
class Run:
    """One run: per step its loss and gradients (host); the compiled step's all-to-alls; the gradients' specs."""

    losses: list[float]
    grads: list[Any]
    all_to_alls: int
    all_to_all_groups: set[str]  # their replica groups, as the compiled program writes them
    expert_grad_specs: dict


@dataclasses.dataclass(frozen=True)
class Placement:
    """The model and its shardings on one mesh: the abstract model (shapes only) and its graphdef, the
    rules with the mesh (``shard``, what ``moe_dispatch`` takes), the params' and optimizer's shardings."""

    graphdef: nnx.GraphDef
    model: nnx.Module
    shard: shardlib.ActivationSharding
    param_sh: Any
    opt_sh: Any

    @classmethod
    def on(cls, mesh: jax.sharding.Mesh) -> Placement:
        rules = project_rules(mesh)
        model = nnx.eval_shape(build)
        graphdef, abstract = nnx.split(model)
        params = shardlib.unbox(abstract)
        param_sh = shardlib.tree_shardings(params, shardlib.logical_axes(abstract, []), rules, mesh)
        opt_sh = shardlib.optimizer_shardings(TX, params, param_sh, mesh)
        return cls(graphdef, model, shardlib.ActivationSharding(rules, mesh), param_sh, opt_sh)

    def initial_state(self, start: Any = None) -> tuple[Any, Any, Any]:
        """(params, opt_state) placed, from ``start`` (host) or a fresh model; and the host copy."""
        if start is None:

            def create():
                params = nnx.to_pure_dict(nnx.state(build()))
                return params, TX.init(params)

            start = jax.device_get(jax.jit(create, out_shardings=(self.param_sh, self.opt_sh))())
        params, opt_state = jax.device_put(start, (self.param_sh, self.opt_sh))
        return params, opt_state, start


def pipelined_step(placed: Placement):
    """(the jitted step ``(params, opt_state, tokens [M, B/M, L]) -> (params, opt_state, loss, grads)``
    through the pipeline, the tokens' sharding: rows over the rules' ``batch`` axes)."""
    mesh, shard, param_sh = placed.shard.mesh, placed.shard, placed.param_sh
    stacked_sh, outer_sh = shardlib.split_stacked(param_sh, "blocks")
    axis = shardlib.pipeline_axis(shard.rules)
    plan = shardlib.plan_pipeline(
        SETTINGS,
        mesh.shape[axis],
        N_LAYERS,
        BATCH,
        collectives_inside_stages=True,  # the experts' all-to-alls
        platform=mesh.devices.flat[0].platform,
        axis=axis,
    )
    if not np.array_equal(plan.layer_order, np.arange(N_LAYERS)):
        raise ValueError(f"{SETTINGS.schedule} stores the layers out of order ({plan.layer_order}); reorder them")
    fns = stage_functions(placed.model, shard)
    token_axes = batch_axes(shard, BATCH // MICROBATCHES)
    tokens_sh = NamedSharding(mesh, P(None, token_axes))

    def step(params, opt_state, tokens_MxBxL):
        stacked, outer = shardlib.split_stacked(params, "blocks")
        loss, d_stacked, d_outer, _ = shardlib.pipeline_loss_and_grads(
            plan.table, fns, stacked, outer, {"tokens": tokens_MxBxL}, mesh, plan.branching,
            layer_specs=specs(stacked_sh), outer_specs=specs(outer_sh),
            batch_axes=token_axes, owned_axes=expert_axes(shard, N_EXPERTS), pipe_axis=plan.axis,
        )  # fmt: skip
        grads = shardlib.merge_stacked(d_stacked, d_outer, "blocks")
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        step,
        in_shardings=(param_sh, placed.opt_sh, tokens_sh),
        out_shardings=(param_sh, placed.opt_sh, replicated, param_sh),
    )
    return jitted, tokens_sh


def reference_step(placed: Placement):
    """(the same step on a mesh of one: the model's own forward on each microbatch, their losses' mean;
    the tokens' sharding)."""
    shard, graphdef = placed.shard, placed.graphdef

    def step(params, opt_state, tokens_MxBxL):
        def loss_fn(params):
            def microbatch_loss(tokens_BxL):
                logits, router_loss, _ = nnx.merge(graphdef, nnx.State(params))(tokens_BxL, shard)
                return cross_entropy(logits, tokens_BxL) + router_loss

            return jnp.mean(jax.lax.map(microbatch_loss, tokens_MxBxL))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    replicated = NamedSharding(shard.mesh, P())
    param_sh, opt_sh = placed.param_sh, placed.opt_sh
    jitted = jax.jit(
        step, in_shardings=(param_sh, opt_sh, replicated), out_shardings=(param_sh, opt_sh, replicated, param_sh)
    )
    return jitted, replicated


def train(mesh: jax.sharding.Mesh, pipelined: bool, start: Any = None) -> tuple[Run, Any]:
    """STEPS AdamW steps on ``mesh`` (through the pipeline, or the reference) from ``start`` or a fresh model."""
    placed = Placement.on(mesh)
    params, opt_state, start = placed.initial_state(start)
    jitted, tokens_sh = pipelined_step(placed) if pipelined else reference_step(placed)
    steps = [jax.device_put(tokens, tokens_sh) for tokens in batches()]
    compiled = jitted.lower(params, opt_state, steps[0]).compile()
    hlo = compiled.as_text()
    groups = set(re.findall(r" all-to-all\(.*?replica_groups=(\S+?\}\}|\[[^ ]+)", hlo))
    run = Run([], [], hlo.count(" all-to-all("), groups, {})
    for tokens in steps:
        params, opt_state, loss, grads = compiled(params, opt_state, tokens)
        run.losses.append(float(loss))
        run.grads.append(jax.device_get(grads))
        run.expert_grad_specs = specs(jax.tree.map(lambda g: g.sharding, grads["blocks"]["moe"]["experts"]))
    return run, start


def main(devices: Sequence[jax.Device] | None = None, check: bool = True) -> dict:
    """Trains through the pipeline on dp 2 x stage 2 x ep 2 and on one device from the same start;
    returns both runs' losses and gradients, the differences, the all-to-alls and the experts' gradients'
    specs. ``check``: raise if they differ by more than ``TOLERANCE`` (a test compares them itself)."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 8:
        raise SystemExit(f"this example needs 8 devices, got {len(devices)}")
    piped, start = train(project_mesh(devices, MESH), pipelined=True)
    reference, _ = train(project_mesh(devices, dict.fromkeys(MESH, 1)), pipelined=False, start=start)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(piped.losses, reference.losses, strict=True))
    grad_error = max(max_relative_error(a, b) for a, b in zip(piped.grads, reference.grads, strict=True))
    print(f"nnx moe pipeline: losses {piped.losses} (one device {reference.losses})")
    print(f"nnx moe pipeline: max relative difference: losses {loss_error:.1e}, gradients {grad_error:.1e}")
    print(
        f"nnx moe pipeline: all-to-alls in the compiled step {piped.all_to_alls}, replica groups "
        f"{sorted(piped.all_to_all_groups)} (one device {reference.all_to_alls}); expert gradients "
        f"{piped.expert_grad_specs}"
    )
    if check and not (loss_error <= TOLERANCE and grad_error <= TOLERANCE):
        raise AssertionError(f"nnx moe pipeline: differs from one device by more than {TOLERANCE}")
    return {
        "loss_error": loss_error,
        "grad_error": grad_error,
        "losses": piped.losses,
        "reference_losses": reference.losses,
        "grads": piped.grads,
        "reference_grads": reference.grads,
        "all_to_alls": piped.all_to_alls,
        "all_to_all_groups": piped.all_to_all_groups,
        "reference_all_to_alls": reference.all_to_alls,
        "expert_grad_specs": piped.expert_grad_specs,
    }


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)  # before the first device use; ignored by GPU/TPU backends
    main()
