"""Sharding two models from other codebases with shardlib's rules, checked against one device.

    python examples/foreign_models.py

Neither model knows shardlib; both are written the way other projects write them:

* ``LinenLM``, T5X/MaxText style: parameters annotated with
  ``nn.with_logical_partitioning`` in its own names (``kv`` for the head
  dimension, ``max_len`` for the position table), unannotated ``LayerNorm``s,
  no activation constraints, and a project mesh with its own axis names
  (``fsdp``, ``tp``). It trains as a flax ``TrainState``.
* ``NNXLM``, Flax-docs style: ``nnx.with_partitioning`` / ``out_sharding``
  metadata with joined head dimensions (``joined_kv`` = heads x head_dim),
  qk-norm scales without metadata, and activation constraints that name mesh
  axes (``P("data", None, "model")``) directly, so it runs on shardlib's own
  mesh. It trains as a plain ``(params, opt_state)`` pair.

For each: the mesh, the rules (a preset, aliases for the model's names, a
rule of the project's own), logical axes from the annotations with patterns
for the rest, parameter and optimizer shardings, the batch's sharding, one
jitted initialiser and one jitted step with explicit in/out shardings, then
the same two steps on one device (``devices=jax.devices()[:1]``): losses and
every parameter must agree within 1e-5 of each leaf's scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import shardlib
from shardlib.analysis.describe import describe

VOCAB, D_MODEL, HEADS, HEAD_DIM, D_MLP, LENGTH, BATCH = 64, 32, 4, 8, 64, 8, 4
STEPS = 2
# eps 1e-3: with 1e-8, AdamW moves an element whose gradient is float32 noise by up to lr,
# whatever the sharding (tests/test_equivalence.py explains), and the comparison says nothing.
TX = optax.adamw(1e-2, eps=1e-3)
TOLERANCE = 1e-5  # of each leaf's largest magnitude


# --- a Linen model, T5X/MaxText style ---------------------------------------------------------

lp = nn.with_logical_partitioning


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="pre_attn_norm")(x)
        q, k, v = (
            nn.DenseGeneral(
                (HEADS, HEAD_DIM),
                use_bias=False,
                name=name,
                kernel_init=lp(nn.initializers.lecun_normal(), ("embed", "heads", "kv")),
            )(h)
            for name in ("query", "key", "value")
        )
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + nn.DenseGeneral(
            D_MODEL,
            axis=(-2, -1),
            use_bias=False,
            name="out",
            kernel_init=lp(nn.initializers.lecun_normal(), ("heads", "kv", "embed")),
        )(attn)
        h = nn.LayerNorm(name="pre_mlp_norm")(x)
        h = nn.Dense(
            D_MLP, use_bias=False, name="wi", kernel_init=lp(nn.initializers.lecun_normal(), ("embed", "mlp"))
        )(h)
        return x + nn.Dense(
            D_MODEL, use_bias=False, name="wo", kernel_init=lp(nn.initializers.lecun_normal(), ("mlp", "embed"))
        )(nn.gelu(h))


class LinenLM(nn.Module):
    num_layers: int = 1

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(
            VOCAB, D_MODEL, name="embed", embedding_init=lp(nn.initializers.normal(0.1), ("vocab", "embed"))
        )
        x = embed(tokens) + self.param(
            "pos_embed", lp(nn.initializers.normal(0.1), ("max_len", "embed")), (LENGTH, D_MODEL)
        )
        for i in range(self.num_layers):
            x = LinenBlock(name=f"block_{i}")(x)
        return embed.attend(nn.LayerNorm(name="final_norm")(x))


# --- an NNX model, Flax-docs style ------------------------------------------------------------


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.norm = nnx.RMSNorm(D_MODEL, rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)))
        self.q, self.k, self.v = (
            nnx.Linear(
                D_MODEL,
                HEADS * HEAD_DIM,
                use_bias=False,
                rngs=rngs,
                kernel_init=nnx.with_partitioning(init, ("embed", "joined_kv")),
            )
            for _ in range(3)
        )
        self.q_norm = nnx.RMSNorm(HEAD_DIM, rngs=rngs)  # no metadata: a pattern covers these
        self.k_norm = nnx.RMSNorm(HEAD_DIM, rngs=rngs)
        self.o = nnx.Linear(
            HEADS * HEAD_DIM,
            D_MODEL,
            use_bias=False,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("joined_kv", "embed")},
        )
        self.mlp_norm = nnx.RMSNorm(
            D_MODEL, rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",))
        )
        self.up = nnx.Linear(
            D_MODEL,
            D_MLP,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
        )
        self.down = nnx.Linear(
            D_MLP, D_MODEL, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("mlp", "embed"))
        )

    def __call__(self, x):
        b, length, _ = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, length, HEADS, HEAD_DIM) for proj in (self.q, self.k, self.v))
        q, k = self.q_norm(q), self.k_norm(k)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), axis=-1)
        x = x + self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, HEADS * HEAD_DIM))
        # Mesh axes named in the model, as the Flax sharding guide does.
        h = jax.lax.with_sharding_constraint(self.up(self.mlp_norm(x)), P("data", None, "model"))
        return x + self.down(jax.nn.gelu(h))


class NNXLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, num_layers: int = 1):
        self.embed = nnx.Embed(
            VOCAB,
            D_MODEL,
            rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.1), ("vocab", "embed")),
        )
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(num_layers)])
        self.final_norm = nnx.RMSNorm(
            D_MODEL, rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",))
        )

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.final_norm(x))


# --- training both, sharded and on one device -------------------------------------------------


def cross_entropy(logits, tokens):
    """Next-token loss: position t predicts token t + 1."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32)


@dataclasses.dataclass
class Result:
    """One model's run: losses, parameters on the host, and their PartitionSpecs."""

    losses: list[float]
    params: Any
    specs: Any


def linen_rules(mesh: jax.sharding.Mesh) -> shardlib.Rules:
    """fsdp_tp on the project's (fsdp, tp) mesh; kv is head_dim; max_len is the project's own rule."""
    rules = shardlib.preset_rules("fsdp_tp", mesh=mesh, mesh_axes={"data": "fsdp", "model": "tp"})
    return shardlib.alias_logical_axes(rules, {"kv": "head_dim"}) + (("max_len", None),)


LINEN_MODEL = LinenLM()  # one instance: a TrainState's apply_fn is part of its tree structure
LINEN_PATTERNS = [(r"(pre_attn_norm|pre_mlp_norm|final_norm)/(scale|bias)$", ("embed",))]


def train_linen(mesh: jax.sharding.Mesh, start: Any = None, show: bool = False) -> tuple[Result, Any]:
    """STEPS steps of LinenLM on ``mesh``; from ``start`` (a host TrainState) if given, else a fresh one.

    Returns the result and the starting state on the host; ``show`` prints where every parameter lives.
    """
    model = LINEN_MODEL
    rules = linen_rules(mesh)
    shard = shardlib.ActivationSharding(rules, mesh)
    # The model constrains no activation; these do, through nn.intercept_methods.
    constraints = shardlib.linen_output_constraints(
        shard, [(r"block_\d+$", ("batch", "length", "embed")), (r"wi$", ("batch", "length", "mlp"))]
    )
    batch = tokens()
    batch_sharding = shardlib.logical_to_sharding(("batch", "length"), rules, mesh, shape=batch.shape)

    boxed = jax.eval_shape(model.init, jax.random.key(0), batch)  # abstract, with Flax's boxes
    axes = shardlib.logical_axes(boxed, LINEN_PATTERNS)  # box names, patterns for the LayerNorms
    params = shardlib.unbox(boxed)
    param_sh = shardlib.tree_shardings(params, axes, rules, mesh)
    if show:
        print(describe(params, axes, rules, mesh).format(), end="\n\n")

    def create(key):
        variables = shardlib.unbox(model.init(key, batch))
        return train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=TX)

    abstract_state = jax.eval_shape(create, jax.random.key(0))
    state_sh = shardlib.train_state_shardings(abstract_state, params, param_sh, mesh)
    if start is None:
        state = jax.jit(create, out_shardings=state_sh)(jax.random.key(0))  # created in its shards
    else:
        state = jax.device_put(start, state_sh)

    def step(state, batch):
        def loss_fn(variables):
            with nn.intercept_methods(constraints):
                return cross_entropy(state.apply_fn(variables, batch), batch)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sharding), out_shardings=(state_sh, replicated))
    initial = jax.device_get(state)
    losses = []
    batch = jax.device_put(batch, batch_sharding)
    for _ in range(STEPS):
        state, loss = jitted(state, batch)
        losses.append(float(loss))
    specs = jax.tree.map(lambda a: a.sharding.spec, state.params)
    return Result(losses, jax.device_get(state.params), specs), initial


NNX_ALIASES = {"joined_kv": ("heads", "head_dim"), "norm": "embed"}
NNX_PATTERNS = [(r"(q_norm|k_norm)/scale$", (None,))]


def train_nnx(mesh: jax.sharding.Mesh, start: Any = None, show: bool = False) -> tuple[Result, Any]:
    """STEPS steps of NNXLM on ``mesh``; from ``start`` (host ``(params, opt_state)``) if given, else fresh."""
    rules = shardlib.alias_logical_axes(shardlib.preset_rules("fsdp_tp"), NNX_ALIASES)
    batch = tokens()
    batch_sharding = shardlib.logical_to_sharding(("batch", "length"), rules, mesh, shape=batch.shape)

    def build():
        with nnx.use_eager_sharding(False):  # shardings come from the rules, below
            return NNXLM(nnx.Rngs(0))

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    axes = shardlib.logical_axes(abstract, NNX_PATTERNS)  # out_sharding metadata, patterns for qk-norms
    params = shardlib.unbox(abstract)  # nnx.to_pure_dict
    param_sh = shardlib.tree_shardings(params, axes, rules, mesh)
    if show:
        print(describe(params, axes, rules, mesh).format(show_rules=False), end="\n\n")
    opt_sh = shardlib.optimizer_shardings(TX, params, param_sh, mesh)

    def create():
        params = nnx.to_pure_dict(nnx.state(build()))
        return params, TX.init(params)

    with jax.set_mesh(mesh):  # the model's bare P(...) constraints resolve against it
        if start is None:
            params, opt_state = jax.jit(create, out_shardings=(param_sh, opt_sh))()  # created in its shards
        else:
            params, opt_state = jax.device_put(start, (param_sh, opt_sh))

        def step(params, opt_state, batch):
            def loss_fn(params):
                return cross_entropy(nnx.merge(graphdef, nnx.State(params))(batch), batch)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = TX.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        replicated = NamedSharding(mesh, P())
        jitted = jax.jit(
            step, in_shardings=(param_sh, opt_sh, batch_sharding), out_shardings=(param_sh, opt_sh, replicated)
        )
        initial = jax.device_get((params, opt_state))
        losses = []
        batch = jax.device_put(batch, batch_sharding)
        for _ in range(STEPS):
            params, opt_state, loss = jitted(params, opt_state, batch)
            losses.append(float(loss))
    specs = jax.tree.map(lambda a: a.sharding.spec, params)
    return Result(losses, jax.device_get(params), specs), initial


def max_relative_error(got: Any, want: Any) -> float:
    """The largest of max|got - want| / max|want| over the leaves."""
    errors = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-12)), got, want
    )
    return max(jax.tree.leaves(errors))


def compare(name: str, train: Callable[..., tuple[Result, Any]], sharded_mesh, one_device_mesh) -> dict:
    """Trains on ``sharded_mesh``, then from the same start on ``one_device_mesh``; raises if they differ."""
    sharded, start = train(sharded_mesh, show=True)
    reference, _ = train(one_device_mesh, start)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(sharded.losses, reference.losses, strict=True))
    param_error = max_relative_error(sharded.params, reference.params)
    print(f"{name}: losses {sharded.losses} (one device {reference.losses})")
    print(f"{name}: max relative difference: losses {loss_error:.1e}, parameters {param_error:.1e}")
    if not (loss_error <= TOLERANCE and param_error <= TOLERANCE):
        raise AssertionError(f"{name}: sharded training differs from one device by more than {TOLERANCE}")
    return {"loss_error": loss_error, "param_error": param_error, "specs": sharded.specs}


def main(devices: Sequence[jax.Device] | None = None) -> dict:
    """Trains both models on 4 devices (data 2 x model 2) and on one; returns the differences and specs."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 4:
        raise SystemExit(f"this example needs 4 devices, got {len(devices)}")
    auto = (AxisType.Auto,) * 2
    project_mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), axis_types=auto, devices=devices[:4])
    project_one = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto, devices=devices[:1])
    results = {"linen": compare("linen", train_linen, project_mesh, project_one)}

    shardlib_mesh = shardlib.build_mesh(shardlib.mesh_spec(data=2, model=2), devices[:4])
    shardlib_one = shardlib.build_mesh(shardlib.mesh_spec(), devices[:1])  # a one-device reference
    results["nnx"] = compare("nnx", train_nnx, shardlib_mesh, shardlib_one)
    return results


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 4)  # before the first device use; ignored by GPU/TPU backends
    main()
