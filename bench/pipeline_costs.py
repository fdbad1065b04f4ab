"""What each pipeline action costs on one device, measured: the check of ``actions.tick_costs``.

``action_steps`` builds one jitted call per action, on one microbatch and one
stage's layers, from the model's own methods (``Transformer.run_layers``,
``Transformer.loss``) and ``jax.vjp``:

    F        the stage forward
    B        its backward recomputing the forward (the executor's default): forward + pullback
    B saved  the pullback alone, from the forward's residuals (``pipeline.recompute: false``)
    split B  the recomputed forward and the input gradient alone (a zero-bubble table's B)
    W        the weight gradient alone: B saved less the input-gradient pullback (both from residuals)
    loss     the loss head's forward and backward (final norm, unembedding, cross-entropy), which
             the last virtual stage runs inside its forward tick
    embed    the embedding's forward and backward, the first virtual stage's

The executor's own split runs W from the weight uses' recorded inputs and
output cotangents (``shardlib.models.layers.weight_grads``); the difference
here is the same matmuls. ``model_ratios`` are ``tick_costs``'s, for the table.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# tick_costs (shardlib.parallel.pipeline.actions), in stage forwards: F 1, a whole backward 3 with
# recomputation and 2 without, a split table's B 2 and W 1; the loss head and the embedding are not counted.
ACTION_NAMES = ("F", "B", "B saved", "split B", "input pullback", "loss", "embed")
MODEL_RATIOS = {
    "F": 1.0,
    "B": 3.0,
    "B saved": 2.0,
    "split B": 2.0,
    "input pullback": 1.0,  # a split B whose forward kept its residuals (pipeline.recompute false)
    "W": 1.0,
    "loss": 0.0,
    "embed": 0.0,
}


def action_steps(model_cfg, layers: int, rows: int, seq_len: int, device) -> dict[str, Callable[[], object]]:
    """name -> a call running that action once on ``device`` (compiled on first use, blocking).

    model_cfg: the run's ``ModelConfig``; layers: one stage's layer count (all its chunks); rows,
    seq_len: one microbatch's [rows, seq_len] tokens. "W" is a pair of calls whose difference
    is the cost (see the module docstring): it maps to a tuple (B saved, input-gradient pullback).
    """
    from shardlib.models import create_model
    from shardlib.models.layers import BlockWeights

    with nnx.use_eager_sharding(False):  # shardings come from the rules in a run; one device here
        model = create_model(model_cfg.model_copy(update={"n_layers": layers}), nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    put = lambda tree: jax.device_put(tree, device)
    state = put(state)
    stack = put(model.layers.weights()._asdict())
    rng = np.random.default_rng(0)
    x_BxLxD = put(jnp.asarray(rng.standard_normal((rows, seq_len, model_cfg.d_model)), model.compute_dtype))
    dy_BxLxD = put(jnp.ones_like(x_BxLxD))
    targets_BxL = put(jnp.asarray(rng.integers(0, model_cfg.vocab_size, (rows, seq_len)), jnp.int32))

    def stage(stack, x_BxLxD):
        return nnx.merge(graphdef, state).run_layers(BlockWeights(**stack), x_BxLxD)

    def head_loss(state, x_BxLxD):
        return nnx.merge(graphdef, state).loss(x_BxLxD, targets_BxL)

    def embed_loss(state, tokens_BxL):
        return jnp.sum(nnx.merge(graphdef, state).embed_tokens(tokens_BxL).astype(jnp.float32))

    _, full_pullback = jax.vjp(stage, stack, x_BxLxD)
    _, input_pullback = jax.vjp(lambda x: stage(stack, x), x_BxLxD)
    forward = jax.jit(stage)
    recomputed = jax.jit(lambda s, x, dy: jax.vjp(stage, s, x)[1](dy))
    saved = jax.jit(lambda pullback, dy: pullback(dy))
    split_b = jax.jit(lambda s, x, dy: jax.vjp(lambda x: stage(s, x), x)[1](dy))
    loss = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    embed = jax.jit(jax.grad(embed_loss))
    block = jax.block_until_ready
    return {
        "F": lambda: block(forward(stack, x_BxLxD)),
        "B": lambda: block(recomputed(stack, x_BxLxD, dy_BxLxD)),
        "B saved": lambda: block(saved(full_pullback, dy_BxLxD)),
        "split B": lambda: block(split_b(stack, x_BxLxD, dy_BxLxD)),
        "input pullback": lambda: block(saved(input_pullback, dy_BxLxD)),
        "loss": lambda: block(loss(state, x_BxLxD)),
        "embed": lambda: block(embed(state, targets_BxL)),
    }


def action_costs(medians: dict[str, float]) -> dict[str, float]:
    """Seconds per action from the medians of ``action_steps``' calls (W = B saved - input pullback)."""
    costs = dict(medians)
    costs["W"] = max(0.0, medians["B saved"] - medians["input pullback"])
    return costs
