"""An NNX mixture-of-experts model from another codebase, trained under expert parallelism, checked against one device.

    python -m examples.nnx_moe        # from the repository root

The model knows nothing of shardlib but the one call its MoE layer makes:

* ``MoEDecoder``, written as a Flax NNX project writes it: its own logical
  names (``model_dim``, ``ffn``, ``num_experts``, ``qkv``), ``out_sharding``
  metadata on every parameter, decoder blocks stacked over layers with
  ``nnx.vmap`` and applied with a scan, each block a function of its own
  parameters and the activations (``apply_block``: what a pipeline stage runs).
* Its MoE layer has a router (``nnx.Linear``) and ``GeluExperts``: GELU MLPs
  with biases, their weights stacked over a leading experts dimension. The
  layer hands the tokens, the router's logits, its expert function
  (``gelu_mlp``) and the stacked weights to ``shardlib.parallel.experts.moe_dispatch``,
  and adds the router's load-balancing and z losses to its objective.

The mesh is the project's own, ``dp`` 2 x ``ep`` 4, with shardlib's ``dp``
preset renamed onto it (``data -> dp``, ``expert -> ep``): the batch is split
over both axes, the experts over ``ep``, and every MoE layer sends its tokens
to their experts' devices and back with two all-to-alls over ``ep``. Two AdamW
steps run there and then, from the same start, on one device (the same code on
a mesh of one): the loss and every gradient of both steps must agree within 1e-5
of each leaf's scale.
"""

from __future__ import annotations

import dataclasses
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
from shardlib.parallel.experts import moe_dispatch

VOCAB, D_MODEL, HEADS, D_FF, N_EXPERTS, N_LAYERS, LENGTH, BATCH = 64, 16, 2, 32, 8, 2, 8, 8
TOP_K, CAPACITY_FACTOR, AUX_WEIGHT, Z_WEIGHT = 2, 1.5, 0.01, 0.001
STEPS = 2
TX = optax.adamw(1e-2, eps=1e-3)  # eps 1e-3: see examples/foreign_models.py
TOLERANCE = 1e-5  # of each leaf's largest magnitude

# --- the model, in its own project's names -----------------------------------------------------

init = nnx.initializers.lecun_normal()


def gelu_mlp(w: dict, x_ExNxD: jax.Array) -> jax.Array:
    """Every expert's GELU MLP with biases on its own N tokens."""
    h_ExNxF = jnp.einsum("end,edf->enf", x_ExNxD, w["w_in"]) + w["b_in"][:, None, :]
    return jnp.einsum("enf,efd->end", jax.nn.gelu(h_ExNxF), w["w_out"]) + w["b_out"][:, None, :]


class GeluExperts(nnx.Module):
    """``num_experts`` GELU MLPs, each weight stacked over a leading experts dimension."""

    def __init__(self, rngs: nnx.Rngs):
        stacked = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        small = nnx.initializers.normal(0.02)
        e, d, f = N_EXPERTS, D_MODEL, D_FF
        self.w_in = nnx.Param(stacked(rngs.params(), (e, d, f)), out_sharding=("num_experts", "model_dim", "ffn"))
        self.b_in = nnx.Param(small(rngs.params(), (e, f)), out_sharding=("num_experts", "ffn"))
        self.w_out = nnx.Param(stacked(rngs.params(), (e, f, d)), out_sharding=("num_experts", "ffn", "model_dim"))
        self.b_out = nnx.Param(small(rngs.params(), (e, d)), out_sharding=("num_experts", "model_dim"))

    def weights(self) -> dict:
        return {name: getattr(self, name)[...] for name in ("w_in", "b_in", "w_out", "b_out")}


class MoELayer(nnx.Module):
    """Top-k routed experts; ``shard`` (shardlib's rules and mesh) says where they live."""

    def __init__(self, rngs: nnx.Rngs):
        self.router = nnx.Linear(
            D_MODEL,
            N_EXPERTS,
            use_bias=False,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("model_dim", None)),
        )
        self.experts = GeluExperts(rngs)

    def __call__(self, x_BxLxD, shard):
        y_BxLxD, stats = moe_dispatch(
            x_BxLxD,
            self.router(x_BxLxD),
            gelu_mlp,
            self.experts.weights(),
            top_k=TOP_K,
            capacity_factor=CAPACITY_FACTOR,
            shard=shard,
        )
        return y_BxLxD, stats


class Block(nnx.Module):
    """Pre-norm causal attention, then the MoE layer in place of the MLP."""

    def __init__(self, rngs: nnx.Rngs):
        ones = nnx.with_partitioning(nnx.initializers.ones, ("model_dim",))
        self.attn_norm = nnx.RMSNorm(D_MODEL, rngs=rngs, scale_init=ones)
        self.qkv = nnx.Linear(
            D_MODEL,
            3 * D_MODEL,
            use_bias=False,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("model_dim", None)),
        )
        self.out = nnx.Linear(
            D_MODEL, D_MODEL, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("qkv", "model_dim"))
        )
        self.moe_norm = nnx.RMSNorm(D_MODEL, rngs=rngs, scale_init=ones)
        self.moe = MoELayer(rngs)

    def __call__(self, x_BxLxD, shard):
        b, length, _ = x_BxLxD.shape
        q, k, v = jnp.split(self.qkv(self.attn_norm(x_BxLxD)).reshape(b, length, 3 * HEADS, -1), 3, axis=2)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x_BxLxD = x_BxLxD + self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, D_MODEL))
        y_BxLxD, stats = self.moe(self.moe_norm(x_BxLxD), shard)
        return x_BxLxD + y_BxLxD, stats


@nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "stack"})
def stacked_blocks(rngs: nnx.Rngs) -> Block:
    return Block(rngs)


def apply_block(graphdef: nnx.GraphDef, block_params: nnx.State, x_BxLxD: jax.Array, shard):
    """One decoder layer as a function of its parameters and the activations: (x, the layer's MoE stats)."""
    return nnx.merge(graphdef, block_params)(x_BxLxD, shard)


class MoEDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(
            VOCAB,
            D_MODEL,
            rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.1), ("vocab_size", "model_dim")),
        )
        self.blocks = stacked_blocks(rngs.split(N_LAYERS))
        self.final_norm = nnx.RMSNorm(
            D_MODEL, rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones, ("model_dim",))
        )

    def __call__(self, tokens_BxL, shard):
        """(logits, the router's loss: the MoE layers' mean weighted aux and z losses, dropped pairs)."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x_BxLxD, block_params):
            return apply_block(graphdef, block_params, x_BxLxD, shard)

        x_BxLxD, stats = jax.lax.scan(layer, self.embed(tokens_BxL), stacked)
        router_loss = AUX_WEIGHT * jnp.mean(stats.aux_loss) + Z_WEIGHT * jnp.mean(stats.z_loss)
        return self.embed.attend(self.final_norm(x_BxLxD)), router_loss, jnp.sum(stats.dropped)


# --- training it with shardlib's rules ---------------------------------------------------------

ALIASES = {
    "model_dim": "embed",
    "ffn": "mlp",
    "num_experts": "experts",
    "qkv": ("heads", "head_dim"),
    "vocab_size": "vocab",
    "stack": "layers",
}


def project_mesh(devices: Sequence[jax.Device], dp: int, ep: int) -> jax.sharding.Mesh:
    return jax.make_mesh((dp, ep), ("dp", "ep"), axis_types=(AxisType.Auto,) * 2, devices=devices[: dp * ep])


def project_rules(mesh: jax.sharding.Mesh) -> shardlib.Rules:
    """shardlib's dp preset on the project's (dp, ep) mesh, with the model's names as aliases."""
    rules = shardlib.preset_rules("dp", mesh=mesh, mesh_axes={"data": "dp", "expert": "ep"})
    return shardlib.alias_logical_axes(rules, ALIASES)


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32)


def build() -> MoEDecoder:
    with nnx.use_eager_sharding(False):  # shardings come from the rules
        return MoEDecoder(nnx.Rngs(0))


@dataclasses.dataclass
class Run:
    """One run: per step its loss, gradients (host) and dropped pairs; the expert weights' specs."""

    losses: list[float]
    grads: list[Any]
    dropped: list[float]
    expert_specs: dict
    all_to_alls: int  # in the compiled step


def train(mesh: jax.sharding.Mesh, start: Any = None) -> tuple[Run, Any]:
    """STEPS AdamW steps on ``mesh`` from ``start`` (host ``(params, opt_state)``) or a fresh model."""
    rules = project_rules(mesh)
    shard = shardlib.ActivationSharding(rules, mesh)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    axes = shardlib.logical_axes(abstract, [])  # every parameter carries out_sharding metadata
    params = shardlib.unbox(abstract)
    param_sh = shardlib.tree_shardings(params, axes, rules, mesh)
    opt_sh = shardlib.optimizer_shardings(TX, params, param_sh, mesh)
    batch = tokens()
    batch_sh = shardlib.logical_to_sharding(("batch", "length"), rules, mesh, shape=batch.shape)

    def create():
        params = nnx.to_pure_dict(nnx.state(build()))
        return params, TX.init(params)

    if start is None:
        params, opt_state = jax.jit(create, out_shardings=(param_sh, opt_sh))()
    else:
        params, opt_state = jax.device_put(start, (param_sh, opt_sh))

    def step(params, opt_state, batch):
        def loss_fn(params):
            logits, router_loss, dropped = nnx.merge(graphdef, nnx.State(params))(batch, shard)
            return cross_entropy(logits, batch) + router_loss, dropped

        (loss, dropped), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads, dropped

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        step,
        in_shardings=(param_sh, opt_sh, batch_sh),
        out_shardings=(param_sh, opt_sh, replicated, param_sh, replicated),
    )
    start = jax.device_get((params, opt_state))
    batch = jax.device_put(batch, batch_sh)
    all_to_alls = jitted.lower(params, opt_state, batch).compile().as_text().count(" all-to-all(")
    run = Run([], [], [], {}, all_to_alls)
    for _ in range(STEPS):
        params, opt_state, loss, grads, dropped = jitted(params, opt_state, batch)
        run.losses.append(float(loss))
        run.grads.append(jax.device_get(grads))
        run.dropped.append(float(dropped))
    run.expert_specs = jax.tree.map(lambda a: a.sharding.spec, params["blocks"]["moe"]["experts"])
    return run, start


def main(devices: Sequence[jax.Device] | None = None) -> dict:
    """Trains on dp 2 x ep 4 and on one device from the same start; returns the differences and layout."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 8:
        raise SystemExit(f"this example needs 8 devices, got {len(devices)}")
    sharded, start = train(project_mesh(devices, dp=2, ep=4))
    reference, _ = train(project_mesh(devices, dp=1, ep=1), start)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(sharded.losses, reference.losses, strict=True))
    grad_error = max(max_relative_error(a, b) for a, b in zip(sharded.grads, reference.grads, strict=True))
    print(f"nnx moe: losses {sharded.losses} (one device {reference.losses}); dropped pairs {sharded.dropped}")
    print(f"nnx moe: max relative difference: losses {loss_error:.1e}, gradients {grad_error:.1e}")
    print(f"nnx moe: {sharded.all_to_alls} all-to-alls in the compiled step; experts {sharded.expert_specs}")
    if not (loss_error <= TOLERANCE and grad_error <= TOLERANCE):
        raise AssertionError(f"nnx moe: expert-parallel training differs from one device by more than {TOLERANCE}")
    return {
        "loss_error": loss_error,
        "grad_error": grad_error,
        "dropped": sharded.dropped,
        "reference_dropped": reference.dropped,
        "all_to_alls": sharded.all_to_alls,
        "reference_all_to_alls": reference.all_to_alls,
        "expert_specs": sharded.expert_specs,
    }


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)  # before the first device use; ignored by GPU/TPU backends
    main()
