"""A Linen decoder from another codebase under fsdp_tp, its weight gradients reduced at the minimum bytes.

    python examples/linen_fsdp_tp.py

The model knows nothing of shardlib: its own module names, ``nn.Embed``,
``nn.DenseGeneral`` / ``nn.Dense`` annotated with ``nn.with_logical_partitioning``,
an RMSNorm of its own, ``nn.scan`` over the layers, an untied output head. It
is sharded with shardlib's ``fsdp_tp`` preset on data 4 x model 2 and trained
two steps with the public reduction (``shardlib.parallel.reduced_dense.LinenReduction``
through ``nn.intercept_methods``: no change to the model), then on one device
from the same start: the loss and every gradient agree within 1e-5 of each
leaf's scale (fp32).

Its bytes per mesh axis are counted from the compiled gradient step with the
project's own counter (``shardlib.analysis.report.collectives``) and compared
with the analytic minimum (``minimum_bytes``); the same step without the
interceptor (the partitioner's reductions: on XLA:CPU an all-reduce and a
slice for each sharded gradient) is counted too.

The attention projects q, k and v with one fused kernel. With three separate
ones (LLaMA's wq, wk, wv) the weight gradients stay at the minimum, but
XLA:CPU all-reduces the three input gradients over ``model`` one by one
before adding them, where one all-reduce of their sum suffices: 1.4x the
tensor-parallel minimum. That is the partitioner's input gradient, which the
per-use reduction leaves to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlib
from shardlib.analysis.report.collectives import find_collectives, split_by_axis
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.parallel.reduced_dense import LinenReduction

VOCAB, D_MODEL, HEADS, HEAD_DIM, D_FF, LAYERS = 64, 32, 4, 8, 64, 2
BATCH, LENGTH = 8, 32  # 64 tokens a device on data 4: no more table rows, so the lookup gathers its table
STEPS = 2
TOLERANCE = 1e-5  # of each leaf's largest magnitude
TX = optax.adamw(1e-2, eps=1e-3)

lp = nn.with_logical_partitioning
kernel_init = nn.initializers.lecun_normal()


# --- the model, as its own project writes it ---------------------------------------------------


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", lp(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        # One fused projection (GPT-NeoX's query_key_value, Gemma's qkv_einsum): see the module docstring.
        qkv = nn.DenseGeneral(
            (3, HEADS, HEAD_DIM),
            use_bias=False,
            name="wqkv",
            kernel_init=lp(kernel_init, ("embed", None, "heads", "kv")),
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.DenseGeneral(
            D_MODEL, axis=(-2, -1), use_bias=False, name="wo", kernel_init=lp(kernel_init, ("heads", "kv", "embed"))
        )(out)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        up = nn.Dense(D_FF, use_bias=False, name="up", kernel_init=lp(kernel_init, ("embed", "mlp")))(x)
        return nn.Dense(D_MODEL, use_bias=False, name="down", kernel_init=lp(kernel_init, ("mlp", "embed")))(
            nn.silu(up)
        )


class DecoderLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + SelfAttention(name="attn")(RMSNorm(name="attn_norm")(x))
        return x + FeedForward(name="ffn")(RMSNorm(name="ffn_norm")(x)), None


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            VOCAB, D_MODEL, name="tok_embed", embedding_init=lp(nn.initializers.normal(1.0), ("vocab", "embed"))
        )(tokens)
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(name="layers")(x, None)
        x = RMSNorm(name="final_norm")(x)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head", kernel_init=lp(kernel_init, ("embed", "vocab")))(x)


MODEL = Decoder()


def cross_entropy(logits, tokens):
    """Next-token loss: position t predicts token t + 1."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


# --- sharding, steps, bytes ---------------------------------------------------------------------


def rules(mesh: jax.sharding.Mesh) -> shardlib.Rules:
    """fsdp_tp; the model's ``kv`` is head_dim, its norm scales are replicated (their own rule)."""
    return shardlib.alias_logical_axes(shardlib.preset_rules("fsdp_tp", mesh=mesh), {"kv": "head_dim"}) + (
        ("norm", None),
    )


def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32)


def grads_fn(mesh: jax.sharding.Mesh, reduced: bool):
    """(jitted ``grads(params, tokens) -> (loss, grads)``, param shardings, batch sharding, the interceptor)."""
    table = rules(mesh)
    tokens = batch()
    boxed = jax.eval_shape(MODEL.init, jax.random.key(0), tokens)
    param_sh = shardlib.tree_shardings(shardlib.unbox(boxed), shardlib.logical_axes(boxed), table, mesh)
    batch_sh = shardlib.logical_to_sharding(("batch", "length"), table, mesh, shape=tokens.shape)
    reduction = LinenReduction(shardlib.ActivationSharding(table, mesh), strict=False)

    def loss_fn(params, tokens):
        if not reduced:
            return cross_entropy(MODEL.apply(params, tokens), tokens)
        with nn.intercept_methods(reduction):
            return cross_entropy(MODEL.apply(params, tokens), tokens)

    replicated = NamedSharding(mesh, P())
    fn = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(param_sh, batch_sh), out_shardings=(replicated, param_sh))
    return fn, param_sh, batch_sh, reduction


def train(mesh: jax.sharding.Mesh, start: Any, reduced: bool = True) -> tuple[list[float], list[Any]]:
    """STEPS AdamW steps from the host parameters ``start``: (losses, each step's gradients on the host)."""
    fn, param_sh, batch_sh, _ = grads_fn(mesh, reduced)
    params = jax.device_put(start, param_sh)
    opt_state = TX.init(params)
    tokens = jax.device_put(batch(), batch_sh)
    losses, grads_seen = [], []
    for _ in range(STEPS):
        loss, grads = fn(params, tokens)
        updates, opt_state = TX.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
        grads_seen.append(jax.device_get(grads))
    return losses, grads_seen


def measured_bytes(mesh: jax.sharding.Mesh, reduced: bool) -> tuple[dict[str, float], LinenReduction]:
    """(wire bytes per device of one gradient step per mesh axis, counted from the compiled HLO; the interceptor)."""
    fn, _, _, reduction = grads_fn(mesh, reduced)
    abstract = jax.eval_shape(lambda: shardlib.unbox(MODEL.init(jax.random.key(0), batch())))
    text = fn.lower(abstract, jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)).compile().as_text()
    totals: dict[str, float] = {a: 0.0 for a in mesh.shape}
    for collective in find_collectives(parse_hlo(text), dict(mesh.shape)):
        for axis, sent in collective.per_axis(dict(mesh.shape)).items():
            totals[axis] += sent
    return totals, reduction


def minimum_bytes(
    params: Any, param_specs: Any, mesh: jax.sharding.Mesh, token_axes: Sequence[str], *, stacked: str = "layers"
) -> dict[str, float]:
    """Per mesh axis, the wire bytes per device a step must move for these parameters' gradients.

    Each parameter, with n the devices of the token axes its spec splits it over (FSDP) and the
    rest of the token axes R: gathered for the forward pass and again for the backward pass
    when it is stacked (under ``nn.scan`` XLA keeps no layer's copy; outside the scan it
    keeps the forward's, and a lookup table's backward needs none), its gradient
    reduce-scattered, (n-1)/n of the gathered bytes each; then the shard all-reduced over R,
    2(|R|-1)/|R| of it. A parameter split over no token axis is only all-reduced. Multi-axis
    groups are attributed to axes as the counter attributes them (``split_by_axis``).
    """
    sizes = dict(mesh.shape)
    out: dict[str, float] = {a: 0.0 for a in sizes}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    specs = jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, P))
    for (path, leaf), spec in zip(flat, specs, strict=True):
        keys = [getattr(k, "key", None) for k in path]
        split = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}
        fsdp = tuple(a for a in token_axes if a in split and sizes[a] > 1)
        rest = tuple(a for a in token_axes if a not in split and sizes[a] > 1)
        local = leaf.size * leaf.dtype.itemsize / np.prod([sizes[a] for a in split])
        gathered = local * np.prod([sizes[a] for a in fsdp])
        gathers = 2 if stacked in keys else 1
        terms = [("all-gather", fsdp, gathered)] * gathers + [("reduce-scatter", fsdp, gathered)]
        terms.append(("all-reduce", rest, local))
        for kind, axes, buffer in terms:
            for axis, sent in split_by_axis(kind, buffer, axes, sizes).items():
                out[axis] += sent
    return out


def tensor_parallel_minimum(mesh: jax.sharding.Mesh) -> float:
    """Wire bytes per device over ``model`` (Megatron): the activations' all-reduces of this decoder.

    Per layer two [b, L, D] all-reduces forward (attention and MLP outputs) and two backward (the
    input gradients of the q/k/v and up projections); the vocabulary-parallel lookup's rows (one,
    forward) and the head's input gradient (one, backward); the loss over the vocabulary, its max,
    sum and target logit ([b, L] each, forward). No parameter gradient is reduced over ``model``.
    """
    t = mesh.shape["model"]
    rows = BATCH // mesh.shape["data"]
    activation = rows * LENGTH * D_MODEL * 4
    loss = rows * (LENGTH - 1) * 4
    return 2 * (t - 1) / t * ((4 * LAYERS + 2) * activation + 3 * loss)


def main(devices: Sequence[jax.Device] | None = None) -> dict:
    """Trains on data 4 x model 2 and on one device; counts bytes with and without the reduction."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 8:
        raise SystemExit(f"this example needs 8 devices, got {len(devices)}")
    mesh = shardlib.build_mesh(shardlib.mesh_spec(data=4, model=2), devices[:8])
    one = shardlib.build_mesh(shardlib.mesh_spec(), devices[:1])
    start = jax.device_get(shardlib.unbox(MODEL.init(jax.random.key(0), batch())))

    losses, grads = train(mesh, start)
    ref_losses, ref_grads = train(one, start)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    grad_error = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-12))
        for got, want in zip(grads, ref_grads, strict=True)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    if not (loss_error <= TOLERANCE and grad_error <= TOLERANCE):
        raise AssertionError(f"sharded differs from one device: loss {loss_error:.1e}, gradients {grad_error:.1e}")

    _, param_sh, _, _ = grads_fn(mesh, True)
    specs = jax.tree.map(lambda s: s.spec, param_sh)
    minimum = minimum_bytes(start, specs, mesh, ("data",))
    minimum["model"] = tensor_parallel_minimum(mesh)
    (reduced, reduction), (plain, _) = measured_bytes(mesh, True), measured_bytes(mesh, False)
    ratios = {a: reduced[a] / minimum[a] for a in ("data", "model")}
    plain_ratios = {a: plain[a] / minimum[a] for a in ("data", "model")}
    print(
        f"losses {losses} (one device {ref_losses}); max relative error: loss {loss_error:.1e}, grads {grad_error:.1e}"
    )
    for axis in ("data", "model"):
        print(
            f"{axis:>5}: minimum {minimum[axis] / 1024:8.1f} KiB, with the reduction {reduced[axis] / 1024:8.1f} KiB "
            f"({ratios[axis]:.3f}x), without {plain[axis] / 1024:8.1f} KiB ({plain_ratios[axis]:.3f}x)"
        )
    print(reduction.describe())
    return {
        "loss_error": loss_error,
        "grad_error": grad_error,
        "minimum": minimum,
        "reduced": reduced,
        "plain": plain,
        "ratios": ratios,
        "plain_ratios": plain_ratios,
        "left": dict(reduction.left),
    }


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)  # before the first device use; ignored by GPU/TPU backends
    main()
