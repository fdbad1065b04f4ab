"""A Linen decoder from another codebase, trained with a ZB-V pipeline and ring attention over ``seq``.

    python examples/linen_pipeline.py

The model knows nothing of shardlib: a GPT-style decoder in the common Linen
style (``nn.Embed`` tokens and learned positions, pre-norm blocks scanned with
``nn.scan(variable_axes={"params": 0})``, its own causal attention module,
``nn.Dense`` everywhere). Its attention takes an ``impl``: ``"dense"`` on one
device, ``"ring"`` inside the pipeline, where each device holds its block of
every sequence and keys and values travel around the ``seq`` ring.

On 8 devices, pipe 2 x data 2 x seq 2: ``linen_layer`` makes the scanned block
the pipeline's layer (its ``nn.Dense`` kernels through the weight-use hook, so
ZB-V's W takes their gradients from what B kept), ``split_stacked`` cuts the
params into the stack and the rest, and ``pipeline_loss_and_grads`` runs the
ZB-V table with the batch over ``data`` and the sequence over ``seq``. The
inputs are a pytree of tokens, targets and positions, so the embedding of each
sequence block adds its own positions. Two Adam steps, then the same two steps
on one device: each step's loss and every gradient must agree within 1e-5 of
each leaf's scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.parallel.pipeline.executor import pipeline_loss_and_grads
from shardlib.parallel.pipeline.flax_layers import linen_layer, merge_stacked, split_stacked
from shardlib.parallel.pipeline.plan import PipelineSettings, plan_pipeline
from shardlib.parallel.pipeline.stacked import stacked_stage_functions
from shardlib.parallel.seq_attention import dot_product_attention

TOLERANCE = 1e-5  # relative to each leaf's (and the loss's) own scale
VOCAB, WIDTH, HEADS, LAYERS, SEQ_LEN, BATCH, MICROBATCHES = 64, 32, 4, 4, 16, 8, 4
MESH = {"pipe": 2, "data": 2, "seq": 2}


class CausalSelfAttention(nn.Module):
    n_heads: int
    impl: str = "dense"  # "ring": this device's block of the sequence, keys and values around ``seq``

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        qkv = nn.Dense(3 * width, name="c_attn")(x).reshape(batch, length, 3, self.n_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.impl == "ring":
            # Inside the pipeline's shard_map `seq` is manual: the call runs the ring on this device's block.
            out = dot_product_attention(q, k, v, is_causal=True, impl="ring", seq_axis="seq", batch_axes="data")
        else:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return nn.Dense(width, name="c_proj")(out.reshape(batch, length, width))


class Block(nn.Module):
    n_heads: int
    impl: str = "dense"

    @nn.compact
    def __call__(self, x, _):
        x = x + CausalSelfAttention(self.n_heads, self.impl, name="attn")(nn.LayerNorm(name="ln_1")(x))
        h = nn.gelu(nn.Dense(4 * x.shape[-1], name="c_fc")(nn.LayerNorm(name="ln_2")(x)))
        return x + nn.Dense(x.shape[-1], name="mlp_proj")(h), None


class GPT(nn.Module):
    impl: str = "dense"

    def setup(self):
        self.wte = nn.Embed(VOCAB, WIDTH)
        self.wpe = nn.Embed(SEQ_LEN, WIDTH)
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        self.h = scanned(HEADS, self.impl)
        self.ln_f = nn.LayerNorm()
        self.lm_head = nn.Dense(VOCAB, use_bias=False)

    def embed(self, tokens, positions):
        return self.wte(tokens) + self.wpe(positions)

    def head(self, x):
        return self.lm_head(self.ln_f(x))

    def __call__(self, tokens, positions):
        x, _ = self.h(self.embed(tokens, positions), None)
        return self.head(x)


def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def one_device_grads(params, batch):
    """(loss, grads) of the whole batch on one device: dense causal attention, every position."""

    def loss_fn(p):
        return cross_entropy(GPT().apply({"params": p}, batch["tokens"], batch["positions"]), batch["targets"])

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def pipelined_grads(mesh: jax.sharding.Mesh, settings: PipelineSettings):
    """``grads(params, batch) -> (loss, grads)`` through the pipeline, ``batch`` a pytree [M, B/M, L] each."""
    model, block = GPT(impl="ring"), Block(HEADS, impl="ring")
    layer, uses = linen_layer(block)
    fns = stacked_stage_functions(
        embed=lambda outer, mb: model.apply({"params": outer}, mb["tokens"], mb["positions"], method=GPT.embed),
        layer=layer,
        loss=lambda outer, x, mb: cross_entropy(model.apply({"params": outer}, x, method=GPT.head), mb["targets"]),
        weight_uses=uses,
    )
    plan = plan_pipeline(
        settings,
        mesh.shape["pipe"],
        LAYERS,
        BATCH,
        collectives_inside_stages=True,
        platform=mesh.devices.flat[0].platform,
    )

    @jax.jit
    def grads(stacked, outer, inputs):
        loss, d_stacked, d_outer, _ = pipeline_loss_and_grads(
            plan.table, fns, stacked, outer, inputs, mesh, plan.branching,
            batch_axes=("data",), length_axes=("seq",), pipe_axis=plan.axis,
        )  # fmt: skip
        return loss, d_stacked, d_outer

    return plan, grads


def make_batches(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN))
    return [
        {
            "tokens": rng.integers(0, VOCAB, (BATCH, SEQ_LEN), dtype=np.int32),
            "targets": rng.integers(0, VOCAB, (BATCH, SEQ_LEN), dtype=np.int32),
            "positions": positions.copy(),
        }
        for _ in range(steps)
    ]


def max_relative_error(actual, expected) -> float:
    """The largest over leaves of max|a - b| / max|b|."""
    errors = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(b))), 1e-30)),
        actual,
        expected,
    )
    return max(jax.tree.leaves(errors))


def main(devices: Sequence[jax.Device] | None = None, steps: int = 2) -> dict:
    """Train ``steps`` Adam steps both ways; returns each step's losses and the largest relative errors."""
    devices = list(devices or jax.devices()[:8])
    mesh = jax.make_mesh(tuple(MESH.values()), tuple(MESH), axis_types=(AxisType.Explicit,) * 3, devices=devices)
    params = GPT().init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32), jnp.zeros((1, SEQ_LEN), jnp.int32))
    params = params["params"]
    optimizer = optax.adam(1e-2)
    plan, grads_fn = pipelined_grads(mesh, PipelineSettings("zb-v", MICROBATCHES, virtual_stages=2))
    inverse = np.argsort(plan.layer_order)

    def to_mesh(batch):  # [B, L] -> [M, B/M, L]: rows over data, positions over seq
        split = {k: v.reshape(MICROBATCHES, BATCH // MICROBATCHES, SEQ_LEN) for k, v in batch.items()}
        return jax.device_put(split, NamedSharding(mesh, P(None, "data", "seq")))

    ref_params, piped_params = params, params
    ref_state, piped_state = optimizer.init(params), optimizer.init(params)
    results = {"losses": [], "ref_losses": [], "loss_error": 0.0, "grad_error": 0.0}
    for batch in make_batches(steps):
        ref_loss, ref_grads = jax.device_get(one_device_grads(ref_params, batch))
        stacked, outer = split_stacked(piped_params, "h")
        stacked = jax.device_put(jax.tree.map(lambda w: w[plan.layer_order], stacked), NamedSharding(mesh, P("pipe")))
        loss, d_stacked, d_outer = jax.device_get(
            grads_fn(stacked, jax.device_put(outer, NamedSharding(mesh, P())), to_mesh(batch))
        )
        grads = merge_stacked(jax.tree.map(lambda g: g[inverse], d_stacked), d_outer, "h")  # logical layer order
        results["losses"].append(float(loss))
        results["ref_losses"].append(float(ref_loss))
        results["loss_error"] = max(results["loss_error"], abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)))
        results["grad_error"] = max(results["grad_error"], max_relative_error(grads, ref_grads))
        results["last_grads"], results["last_ref_grads"] = grads, ref_grads
        updates, ref_state = optimizer.update(ref_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        updates, piped_state = optimizer.update(grads, piped_state, piped_params)
        piped_params = optax.apply_updates(piped_params, updates)
    if results["loss_error"] > TOLERANCE or results["grad_error"] > TOLERANCE:
        raise AssertionError(
            f"the pipeline differs from one device: {results['loss_error']=}, {results['grad_error']=}"
        )
    return results


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    out = main()
    print(f"losses {out['losses']} (one device {out['ref_losses']}); max relative error: loss "
          f"{out['loss_error']:.2e}, gradients {out['grad_error']:.2e}")  # fmt: skip
