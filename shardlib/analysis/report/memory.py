"""The ideal memory per device: parameters, gradients and optimizer state over their shards, plus activations.

Activations are not guessed from a formula: the per-layer residuals (what
the backward pass keeps from the forward pass) are read off the model's own
decoder block by tracing ``jax.vjp`` of it, abstractly, at the shapes one
device computes on (its rows, its part of the sequence, its heads and MLP
columns), under the config's remat policy. The scan keeps one such set per
layer plus each layer's input. Only one microbatch is alive at a time.

On top of the stored state the step needs, per device:

* the gradients (sharded like the parameters) and, with ``grad_accum`` > 1 or
  a pipeline, the accumulator beside them, plus half a copy of temporaries for clipping
  and the AdamW update;
* FSDP: one layer's gathered weights, and its unsliced gradient;
* the logits in float32 and their gradient (vocabulary split over ``model``);
* with remat, the recomputed residuals of the one layer being differentiated;
* DiLoCo and local SGD (``outer``): beside each replica's own parameters and
  AdamW moments, the period's start (the anchor, sharded like a replica's
  parameters), the outer momentum (DiLoCo with momentum > 0) and, with
  ``outer.compression``, the compressed reduction's residuals (1 + 1/R
  copies): a parameter copy each.

The eval step runs between training steps, beside the stored state, with its
own working set (``eval_working``): the forward alone, one layer at a time, on
the whole batch of a device (no accumulation splits it) or, with a pipeline,
through the schedule's forward-only table on one microbatch at a time, each
stage holding only its own layers (``shardlib.models.pipeline_stages.make_pipeline_loss``).
A device's memory is the larger of the two steps' (``MemoryEstimate.peak``).

This is a model of what must be alive at the peak, not of XLA's buffer
assignment; ``shardlib.analysis.planner --verify`` compares it with ``memory_analysis()``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Var

from shardlib.analysis.report.layout import Layout
from shardlib.parallel.pipeline.plan import PipelinePlan, plan_pipeline

OPTIMIZER_COPIES = 2  # AdamW: first and second moments, in the parameter dtype


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step at its peak."""

    params: float
    grads: float
    optimizer: float
    batch: float
    gathered: float  # FSDP: one layer's weights gathered, and its unsliced gradient
    activations: float  # residuals of every layer, for one microbatch
    working: float  # logits and the backward working set of one layer
    outer: float = 0.0  # DiLoCo: the anchor, the outer momentum, the pseudo-gradient's residuals
    eval_working: float = 0.0  # the eval step's own: gathered weights, activations, logits (no gradients)

    @property
    def state(self) -> float:
        """Parameters + optimizer state (the outer loop's too): what lives between steps."""
        return self.params + self.optimizer + self.outer

    @property
    def total(self) -> float:
        """The training step's peak."""
        return self.state + self.grads + self.batch + self.gathered + self.activations + self.working

    @property
    def eval_total(self) -> float:
        """The eval step's peak: the state stays, its batch and working set come beside it."""
        return self.state + self.batch + self.eval_working

    @property
    def peak(self) -> float:
        """What a device must hold: the larger of the training and the eval step's peaks."""
        return max(self.total, self.eval_total)

    def as_dict(self) -> dict:
        extra = {"state": self.state, "total": self.total, "eval_total": self.eval_total, "peak": self.peak}
        return dataclasses.asdict(self) | extra


def _layer_shapes(rows, length, d, heads, kv_heads, head_dim, d_ff, dtype, param_dtype):
    """(x, one layer's weights, positions) as shape structs at one device's shapes.

    ``heads`` and ``kv_heads`` are the device's own: the fused q/k/v weight
    holds its kv heads with their heads // kv_heads queries each.
    """
    from shardlib.models.layers import BlockWeights

    def sds(*shape, dt=param_dtype):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dt))

    w = BlockWeights(
        attn_norm=sds(d),
        qkv=sds(d, kv_heads, heads // kv_heads + 2, head_dim),
        o=sds(heads, head_dim, d),
        mlp_norm=sds(d),
        gate_up=sds(d, 2, d_ff),
        down=sds(d_ff, d),
    )
    return sds(rows, length, d, dt=dtype), w, sds(rows, length, dt="int32")


@jax.custom_vjp
def _fused_attention(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_pos_BxL, kv_pos_BxM):
    """A stand-in for a fused (flash) kernel at its shapes: the output, and for the backward pass
    only q, k, v, the output and the float32 log-sum-exp per query and head (no [L, M] scores)."""
    from shardlib.models.layers import causal_gqa_attention

    return causal_gqa_attention(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_pos_BxL, kv_pos_BxM)


def _fused_forward(q, k, v, q_pos, kv_pos):
    out = _fused_attention(q, k, v, q_pos, kv_pos)
    lse_BxHxL = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    return out, (q, k, v, out, lse_BxHxL, q_pos, kv_pos)


def _fused_backward(residuals, g):
    q, k, v, *_ = residuals  # shapes only: the trace never runs it
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None, None


_fused_attention.defvjp(_fused_forward, _fused_backward)


def attention_kernel(cfg) -> str:
    """The kernel a layer's attention runs: ``attention.impl``, or Ulysses' ``ulysses_kernel`` (fused or not)."""
    a = cfg.attention
    return "fused" if a.impl == "ulysses" and a.ulysses_kernel == "fused" else a.impl


def attention_for_memory(impl: str):
    """The attention the memory trace runs for ``attention.impl``: the fused kernel keeps no score
    matrix (``_fused_attention``); dense, ring and all-gather attention compute theirs in XLA."""
    return _fused_attention if impl == "fused" else None


def _bytes(shapes) -> int:
    return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))


def _linear_in_rows(traced: Callable[..., int]) -> Callable[..., int]:
    """``traced(rows, *dims)``, a byte count of one layer's arrays, from two traces only.

    Every array a layer's program makes either has the rows dimension (its bytes are
    proportional to rows) or does not (a weight's cast), so the count is exactly
    ``a + b * rows``: traced at 2 and 3 rows (cached; not 1, where a size-1 dimension could be
    handled apart), it holds for every rows, and a planner weighing hundreds of batch splits
    traces each layer shape twice instead of once per split.
    """

    @functools.wraps(traced)
    def at_rows(rows: int, *dims, **options) -> int:
        two, three = traced(2, *dims, **options), traced(3, *dims, **options)
        return two + (three - two) * (rows - 2)

    at_rows.traced = traced  # the direct trace, for tests
    return at_rows


@_linear_in_rows
@functools.lru_cache(maxsize=256)
def layer_residual_bytes(
    rows: int,
    length: int,
    d: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    d_ff: int,
    dtype: str,
    param_dtype: str,
    remat: str,
    attention: str = "dense",
) -> int:
    """Bytes one decoder layer keeps for its backward pass, at one device's shapes (layer input excluded),
    with ``attention`` the config's ``attention.impl`` (``attention_for_memory``)."""
    from shardlib.models.layers import decoder_block
    from shardlib.models.remat import rematerialize

    x, w, positions = _layer_shapes(rows, length, d, heads, kv_heads, head_dim, d_ff, dtype, param_dtype)

    def body(x, w, positions):
        return decoder_block(
            x, w, positions, rope_theta=10000.0, norm_eps=1e-6, attention=attention_for_memory(attention)
        )

    body = rematerialize(body, remat)

    def residuals(x, w, positions):
        _, vjp_fn = jax.vjp(lambda x, w: body(x, w, positions), x, w)
        inputs = {id(leaf) for leaf in jax.tree.leaves((x, w, positions))}
        return [leaf for leaf in jax.tree.leaves(vjp_fn) if id(leaf) not in inputs]

    return _bytes(jax.eval_shape(residuals, x, w, positions))


@_linear_in_rows
@functools.lru_cache(maxsize=256)
def layer_tap_bytes(
    rows: int,
    length: int,
    d: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    d_ff: int,
    dtype: str,
    param_dtype: str,
    outputs: bool = True,
) -> int:
    """Bytes a split backward keeps from one layer's B to its W: every weight use's input and the
    cotangent of its output (``shardlib.models.layers.WeightTap``), at one device's shapes; with
    ``outputs`` off the inputs alone (what a forward keeping its residuals keeps beside them)."""
    from shardlib.models.layers import WeightTap, decoder_block

    x, w, positions = _layer_shapes(rows, length, d, heads, kv_heads, head_dim, d_ff, dtype, param_dtype)

    def tapped(x, w, positions):
        tap = WeightTap()
        decoder_block(x, w, positions, rope_theta=10000.0, norm_eps=1e-6, use=tap)
        return (tap.inputs, tap.outputs) if outputs else tap.inputs

    return _bytes(jax.eval_shape(tapped, x, w, positions))


@functools.lru_cache(maxsize=256)
def layer_forward_bytes(
    rows: int,
    length: int,
    d: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    d_ff: int,
    dtype: str,
    param_dtype: str,
    attention: str = "dense",
) -> int:
    """The most bytes one decoder layer's forward pass holds at once, beside its input and weights, at
    one device's shapes: the peak over its program (``jax.make_jaxpr``, in order) of the
    intermediates made and not yet last used. What an eval step's layer needs; XLA's fusions
    keep fewer alive, so this bounds it from above."""
    from shardlib.models.layers import decoder_block

    x, w, positions = _layer_shapes(rows, length, d, heads, kv_heads, head_dim, d_ff, dtype, param_dtype)
    fused = attention_for_memory(attention)
    jaxpr = jax.make_jaxpr(lambda x, w, p: decoder_block(x, w, p, rope_theta=10000.0, norm_eps=1e-6, attention=fused))(
        x, w, positions
    ).jaxpr
    last_use = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.invars if isinstance(v, Var)}
    last_use.update({v: len(jaxpr.eqns) for v in jaxpr.outvars if isinstance(v, Var)})
    alive: dict = {}
    peak = 0
    for i, eqn in enumerate(jaxpr.eqns):
        alive.update({v: _bytes(v.aval) for v in eqn.outvars})
        peak = max(peak, sum(alive.values()))
        alive = {v: b for v, b in alive.items() if last_use.get(v, -1) > i}
    return peak


def estimate_memory(layout: Layout, activation_dtype: str | None = None) -> MemoryEstimate:
    """Per-device memory of ``layout``'s training step (see the module docstring).

    ``activation_dtype`` overrides the compute dtype for activations: XLA:CPU
    computes bfloat16 models in float32, so a CPU compile is compared with
    ``activation_dtype="float32"`` (``activation_dtype_on``).
    """
    cfg, m = layout.cfg, layout.cfg.model
    activation_dtype = activation_dtype or m.compute_dtype
    c = np.dtype(activation_dtype).itemsize
    params = layout.param_bytes_per_device
    # The gradients, the accumulator beside them, and half a copy more for the update
    # (clipping and AdamW's temporaries: XLA:CPU holds about that much, measured 0.4-0.7).
    # A pipeline's tick loop carries the sums too, but they die as the step's gradients are
    # made, and the update's temporaries take their place (XLA:CPU: within 10% at 2 copies).
    grads = params * (2.5 if cfg.grad_accum > 1 else 2.0 if layout.sizes["pipe"] > 1 else 1.5)
    optimizer = OPTIMIZER_COPIES * params
    batch = 2 * cfg.batch_size * cfg.seq_len * 4 / (layout.batch_shards * layout.seq_shards)

    token_axes = set(layout.token_axes)
    gathered = 0.0
    for p in layout.params:
        fsdp = [a for a in p.mesh_axes if a in token_axes]
        if fsdp and p.scanned:
            f = int(np.prod([layout.sizes[a] for a in fsdp]))
            gathered += 2 * p.bytes_per_device * f / p.shape[0]  # one layer's weights and its gradient

    rows, length = layout.rows_per_device, cfg.seq_len // layout.seq_shards
    residual = _layer_residual(layout, activation_dtype, m.remat)
    layer_input = rows * length * m.d_model * c
    activations = _activations(layout, residual, layer_input, activation_dtype)
    logits = rows * length * m.vocab_size / layout.vocab_shards * 4
    working = 2 * logits  # float32 logits and their gradient
    if m.remat != "none":
        # The backward pass recomputes one layer at a time: what the policy did not
        # save comes back at once; by then the logits are gone (XLA:CPU: within 5%).
        working = max(working, _layer_residual(layout, activation_dtype, "none") - residual)
    return MemoryEstimate(
        params,
        grads,
        optimizer,
        batch,
        gathered,
        activations,
        working,
        outer_copies(cfg, layout.sizes) * params,
        _eval_working(layout, activation_dtype),
    )


def _eval_working(layout: Layout, activation_dtype: str) -> float:
    """The eval step's working set on one device, beside its arguments (parameters and batch).

    Without a pipeline: one layer's weights gathered under FSDP (the scan gathers each in
    turn), one layer's input and forward intermediates (``layer_forward_bytes``) and the float32
    logits, all on the device's whole batch (eval does not accumulate). With one: the stage's
    weights gathered over the batch axes once (as the train step's executor gathers them), with
    two or more chunks a copy of the one a tick runs, the forward-only table's stage-input
    buffer, one layer's intermediates and one microbatch's logits.
    """
    cfg, m = layout.cfg, layout.cfg.model
    c = np.dtype(activation_dtype).itemsize
    pipelined = layout.sizes["pipe"] > 1 and getattr(cfg, "pipeline", None) is not None
    rows = layout.rows_per_device * (1 if pipelined else cfg.grad_accum)
    length = cfg.seq_len // layout.seq_shards
    token_axes = set(layout.token_axes)
    gathered = chunk = 0.0
    for p in layout.params:
        f = int(np.prod([layout.sizes[a] for a in p.mesh_axes if a in token_axes and a not in p.expert_axes]))
        if pipelined:
            gathered += p.bytes_per_device * f if f > 1 else 0.0
            chunk += p.bytes_per_device * f / cfg.pipeline.virtual_stages if p.scanned else 0.0
        elif f > 1:
            gathered += p.bytes_per_device * (f / p.shape[0] if p.scanned else f)
    layer_input = rows * length * m.d_model * c
    intermediates = layer_forward_bytes(rows, *_layer_dims(layout, activation_dtype)[1:], attention_kernel(layout.cfg))
    logits = rows * length * m.vocab_size / layout.vocab_shards * 4
    if not pipelined:
        return gathered + layer_input + intermediates + logits
    buffers = (_pipeline_plan(layout).eval_table.buffer_slots + 1) * layer_input
    copied = chunk if cfg.pipeline.virtual_stages > 1 else 0.0
    return gathered + copied + buffers + intermediates + logits


def outer_copies(cfg, sizes) -> float:
    """Parameter copies the outer loop keeps per device: the anchor, the outer momentum, and the
    compressed reduction's residuals (a worker copy, and the server's 1/R block: ``compression``)."""
    outer = cfg.outer
    if outer.algorithm == "none":
        return 0.0
    momentum = outer.algorithm == "diloco" and outer.momentum > 0
    replicas = int(np.prod([sizes[a] for a in outer.replica_axes]))
    return 1.0 + momentum + (1.0 + 1.0 / replicas if outer.compression != "none" else 0.0)


def _activations(layout: Layout, residual: int, layer_input: int, activation_dtype: str) -> int:
    """What the forward pass keeps for the backward pass, on one device.

    Without a pipeline: every layer's residuals and input for the microbatch.
    With one (``shardlib.parallel.pipeline.executor``): the stage inputs and gradients
    in the buffer the schedule's table needs (GPipe m, 1F1B at most p, plus a
    scratch slot), and one chunk's residuals while its backward pass
    recomputes it from the saved input (with ``pipeline.recompute`` off, a
    chunk's residuals for every microbatch between its forward and backward
    instead). A split (zero-bubble) table also keeps,
    in each residual slot, what its W needs of a chunk (``layer_tap_bytes``
    per layer) and the embedding's gradient; without recomputation its forwards
    keep their tapped chunk's residuals and its weight uses' inputs until the B.
    """
    pipeline = getattr(layout.cfg, "pipeline", None)
    if layout.sizes["pipe"] < 2 or pipeline is None:
        return layout.layers_per_device * (residual + layer_input)
    v = pipeline.virtual_stages
    plan = _pipeline_plan(layout).table
    buffers = (plan.buffer_slots + 1) * layer_input  # stage inputs and gradients share one buffer
    chunk_layers = layout.layers_per_device // v
    if plan.schedule.split_backward:
        buffers += (plan.res_slots + 1) * (chunk_layers * _layer_tap(layout, activation_dtype) + layer_input)
    if plan.schedule.split_backward and not pipeline.recompute:
        # Each forward in flight keeps its tapped chunk's residuals and its weight uses' inputs for its B.
        kept = residual + _layer_tap(layout, activation_dtype, outputs=False)
        return buffers + (plan.saved_slots + 2) * chunk_layers * kept
    if not pipeline.recompute:
        # Every forward in flight keeps its chunk's residuals for its backward, in a buffer with a
        # scratch slot, beside the one slot a branch writes or reads (XLA:CPU: 0.89-0.99).
        return buffers + (plan.saved_slots + 2) * chunk_layers * residual
    return buffers + chunk_layers * (residual + layer_input)


def _pipeline_plan(layout: Layout) -> PipelinePlan:
    """The pipeline ``layout``'s config runs (``plan_pipeline``): its training and eval tables."""
    from shardlib.training.parallel_plan import pipeline_settings  # the training layer's reading of the config

    cfg = layout.cfg
    return plan_pipeline(
        pipeline_settings(cfg),
        layout.sizes["pipe"],
        cfg.model.n_layers,
        cfg.batch_size,
        collectives_inside_stages=False,  # branching does not change the buffers
        platform="any",
    )


def activation_dtype_on(platform: str, compute_dtype: str) -> str:
    """The dtype activations really take on ``platform``: XLA:CPU keeps bfloat16 intermediates in float32."""
    return "float32" if platform == "cpu" else compute_dtype


def _layer_dims(layout: Layout, dtype: str) -> tuple:
    """One layer's shapes on one device, as ``layer_residual_bytes`` and ``layer_tap_bytes`` take them."""
    m = layout.cfg.model
    return (
        layout.rows_per_device,
        layout.cfg.seq_len // layout.seq_shards,
        m.d_model,
        m.n_heads // layout.heads_shards,
        m.n_kv_heads // layout.kv_shards,
        m.resolved_head_dim,
        m.d_ff // layout.mlp_shards,
        dtype,
        m.param_dtype,
    )


def _layer_tap(layout: Layout, dtype: str, outputs: bool = True) -> int:
    """``layer_tap_bytes`` at ``layout``'s per-device shapes (``outputs`` off: the uses' inputs alone)."""
    return layer_tap_bytes(*_layer_dims(layout, dtype), outputs=outputs)


def _layer_residual(layout: Layout, dtype: str, remat: str) -> int:
    """What one layer keeps for the backward pass on one device under ``remat`` (``layer_residual_bytes``)."""
    return layer_residual_bytes(*_layer_dims(layout, dtype), remat, attention_kernel(layout.cfg))
