"""Per-layer transformer math as pure functions of plain arrays.

Nothing here owns parameters: `shardlib.models.transformer` stores them stacked over
layers and scans `decoder_block` over one layer's slice at a time, which keeps
this file free of Flax and easy to test against naive references.

Shape suffixes (nanodo style):
  B batch, L query length, M key length, D d_model, H query heads,
  N kv heads, G query heads per kv head (H = N * G), S = G + 2 projection slots
  per kv head (its G queries, its key, its value), K head_dim, F d_ff, V vocab,
  C tokens per loss chunk, J = L / C loss chunks.

Fused projections. Each layer has one q/k/v weight [D, N, S, K] and one
gate/up weight [D, 2, F] instead of five. Under Megatron tensor parallelism
(kv heads and the MLP hidden dimension split over a mesh axis) the input
gradient of a column-parallel projection is a partial sum that must be
all-reduced; with q, k and v (gate and up) as separate matmuls XLA reduces
each partial sum on its own and adds them afterwards (3 and 2 all-reduces of
[B, L, D] per layer instead of 1 each). One weight means one matmul, one input
gradient, one all-reduce. The q/k/v slots sit under their kv head so that
splitting N keeps each device's queries with the key and value they attend
with; query head h = n * G + g is slot g of kv head n, the grouping
``causal_gqa_attention`` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from shardlib.parallel import weight_use as parallel_weight_use
from shardlib.parallel.dense_attention import MASKED, gqa_attention
from shardlib.parallel.weight_use import PlainWeightUse, WeightUse, WeightUseSpec, tapped_weight_grads

ShardFn = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
"""Constrains an activation by logical axis names, one per dimension."""

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
"""(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM) -> [B, L, H, K], causal."""


def no_shard(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """The default ShardFn: leaves the activation to the compiler."""
    del names
    return x


class _BlockFields(NamedTuple):
    attn_norm: jax.Array  # [D]
    qkv: jax.Array  # [D, N, S, K]: slots 0..G-1 queries of kv head n, G its key, G + 1 its value
    o: jax.Array  # [H, K, D]
    mlp_norm: jax.Array  # [D]
    gate_up: jax.Array  # [D, 2, F]: 0 gate, 1 up
    down: jax.Array  # [F, D]
    qkv_bias: jax.Array | None = None  # [N, S, K], as qkv's output; None: no bias (model.qkv_bias false)


class BlockWeights(_BlockFields):
    """One decoder layer's parameters (a slice of the stacked `layers` params).

    A weight the model does not have is None; ``_asdict`` leaves it out, so
    ``BlockWeights(**params["layers"])._asdict()`` has the parameter tree's keys.
    """

    __slots__ = ()

    def _asdict(self) -> dict[str, jax.Array]:
        return {name: w for name, w in zip(self._fields, self, strict=True) if w is not None}


def fuse_qkv(q_Dx___xHxK: jax.Array, k_Dx___xNxK: jax.Array, v_Dx___xNxK: jax.Array) -> jax.Array:
    """q [..., H, K], k, v [..., N, K] weights as the fused [..., N, S, K]: query head h = n * G + g in slot g
    of kv head n, k in slot G, v in G + 1 (``split_qkv`` undoes it on the projection's output)."""
    *lead, n_kv, head_dim = k_Dx___xNxK.shape
    q_Dx___xNxGxK = q_Dx___xHxK.reshape(*lead, n_kv, q_Dx___xHxK.shape[-2] // n_kv, head_dim)
    return jnp.concatenate([q_Dx___xNxGxK, k_Dx___xNxK[..., None, :], v_Dx___xNxK[..., None, :]], axis=-2)


def fuse_gate_up(gate_Dx___xF: jax.Array, up_Dx___xF: jax.Array) -> jax.Array:
    """gate, up [..., F] weights as the fused [..., 2, F]: 0 gate, 1 up."""
    return jnp.stack([gate_Dx___xF, up_Dx___xF], axis=-2)


def split_qkv(qkv_Bx___xNxSxK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused projection's output [..., N, S, K] as (q [..., H, K], k [..., N, K], v [..., N, K]).

    Query head h = n * G + g is slot g of kv head n (S = G + 2): merging N and
    G, N outer, gives the head order ``causal_gqa_attention`` groups by.
    """
    *lead, n_kv, slots, head_dim = qkv_Bx___xNxSxK.shape
    group = slots - 2
    q = qkv_Bx___xNxSxK[..., :group, :].reshape(*lead, n_kv * group, head_dim)
    return q, qkv_Bx___xNxSxK[..., group, :], qkv_Bx___xNxSxK[..., group + 1, :]


def normal_init(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    """N(0, std^2) initial weights of ``shape`` in ``dtype``, for every module's parameters."""
    # Sampled in float32 and then cast, so bf16 and fp32 models built from the
    # same seed hold the same values up to rounding.
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32."""
    logprobs_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    picked_BxL = jnp.take_along_axis(logprobs_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked_BxL)


def chunked_cross_entropy(
    x_BxLxD: jax.Array,
    targets_BxL: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int,
    *,
    shard: ShardFn = no_shard,
) -> jax.Array:
    """Mean next-token cross-entropy of ``logits_fn(x_BxLxD)`` without ever holding the [B, L, V] logits.

    ``logits_fn`` maps a residual-stream chunk [B, C, D] to float32 logits
    [B, C, V] token by token (final norm and output projection:
    ``Transformer.logits``); ``chunk`` is C, the tokens per chunk, which must
    divide L. The result equals ``cross_entropy(logits_fn(x_BxLxD), targets_BxL)``
    up to float32 summation order, as do its gradients.

    The sequence is cut into J = L / C chunks, chunk j holding positions
    j, J + j, 2J + j, ... (L reshaped to [C, J], the loop running over J):
    strided, like ``split_microbatches``' rows, so that a sequence sharded
    contiguously over the ``seq`` mesh axis stays where it is, each device
    holding C / seq tokens of every chunk; a contiguous chunk would live on
    one device and the loop would have to move it. C must therefore divide
    over the sequence's mesh axes (``shard`` raises otherwise, an error naming
    ``model.loss_chunk``). One ``lax.map`` step per chunk computes the chunk's
    logits (float32 accumulation), their log-softmax and the targets'
    log-probabilities [B, C] (a one-hot select: local on a vocabulary sharded
    over ``model``, where a gather would not be); the step is under
    ``jax.checkpoint``, so the backward pass recomputes each chunk's logits
    instead of keeping them, and the largest float32 buffer is [B, C, V]. The
    [B, L] log-probabilities are put back in order and averaged as
    ``cross_entropy`` averages them, in float32.
    """
    batch, length, d = x_BxLxD.shape
    if chunk <= 0 or length % chunk:
        raise ValueError(f"model.loss_chunk={chunk} must divide the sequence length {length}")
    chunks = length // chunk
    x_JxBxCxD = x_BxLxD.reshape(batch, chunk, chunks, d).transpose(2, 0, 1, 3)
    targets_JxBxC = targets_BxL.reshape(batch, chunk, chunks).transpose(2, 0, 1)
    try:
        x_JxBxCxD = shard(x_JxBxCxD, (None, "batch", "length", "embed"))
        targets_JxBxC = shard(targets_JxBxC, (None, "batch", "length"))
    except ValueError as err:  # e.g. C tokens that do not divide over `seq`
        raise ValueError(f"model.loss_chunk={chunk} does not fit the mesh: {err}") from err

    def chunk_logprobs(xs):
        x_BxCxD, targets_BxC = xs
        logprobs_BxCxV = jax.nn.log_softmax(logits_fn(x_BxCxD).astype(jnp.float32), axis=-1)
        vocab = logprobs_BxCxV.shape[-1]
        # As ``cross_entropy``'s take_along_axis: a negative id counts from the end, one past it gives NaN.
        targets_BxC = jnp.where(targets_BxC < 0, targets_BxC + vocab, targets_BxC)
        hit_BxCxV = targets_BxC[..., None] == jnp.arange(vocab, dtype=targets_BxC.dtype)
        picked_BxC = jnp.sum(jnp.where(hit_BxCxV, logprobs_BxCxV, 0.0), axis=-1)
        return jnp.where((targets_BxC >= 0) & (targets_BxC < vocab), picked_BxC, jnp.nan)

    # Inside the loop XLA cannot merge the recomputation with the forward pass,
    # so prevent_cse would only cost performance (as in ``rematerialize``).
    picked_JxBxC = jax.lax.map(jax.checkpoint(chunk_logprobs, prevent_cse=False), (x_JxBxCxD, targets_JxBxC))
    # Back in [B, L] order, reduced as ``cross_entropy`` reduces: the same float32 sum.
    picked_BxL = shard(picked_JxBxC.transpose(1, 2, 0).reshape(batch, length), ("batch", "length"))
    return -jnp.mean(picked_BxL)


def rms_normalize(x_BxLxD: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) in float32 (RMSNorm before its scale)."""
    x32_BxLxD = x_BxLxD.astype(jnp.float32)
    mean_sq_BxLx1 = jnp.mean(jnp.square(x32_BxLxD), axis=-1, keepdims=True)
    return x32_BxLxD * jax.lax.rsqrt(mean_sq_BxLx1 + eps)


def _einsum(equation: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return lambda x, w: jnp.einsum(equation, x, w.astype(x.dtype))


def _bias(x_BxLxD: jax.Array, b_NxSxK: jax.Array) -> jax.Array:
    """The q/k/v bias broadcast to the projection's output [B, L, N, S, K] (linear in the bias)."""
    return jnp.broadcast_to(b_NxSxK.astype(x_BxLxD.dtype), (*x_BxLxD.shape[:2], *b_NxSxK.shape))


def _logits(equation: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The output projection: in x's dtype, accumulated and returned in float32."""
    return lambda x, w: jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


# Every use of a weight, as a table: the pipeline's split backward (zero-bubble schedules)
# records each layer use's input and output cotangent here and later takes the weight gradient from
# them; ``shardlib.parallel.reduction`` reduces each use's weight gradient over the token axes itself.
_HEADS = ("batch", "length", "heads", "head_dim")
_QKV = ("batch", "length", "kv_heads", None, "head_dim")  # [B, L, N, G+2, K]: queries, key, value per kv head
_MLP = ("batch", "length", "mlp")
_GATE_UP = ("batch", "length", None, "mlp")
_VOCAB = ("batch", "length", "vocab")

WEIGHT_USES: dict[str, WeightUseSpec] = {
    "attn_norm": WeightUseSpec(lambda x, w: x * w.astype(x.dtype), "normed_attn"),  # x/rms(x), float32
    "qkv": WeightUseSpec(_einsum("bld,dnsk->blnsk"), "h_attn", output_axes=_QKV),
    "qkv_bias": WeightUseSpec(_bias, "h_attn", output_axes=_QKV),  # added to qkv's output
    "o": WeightUseSpec(_einsum("blhk,hkd->bld"), "attn", input_axes=_HEADS),
    "mlp_norm": WeightUseSpec(lambda x, w: x * w.astype(x.dtype), "normed_mlp"),
    "gate_up": WeightUseSpec(_einsum("bld,dcf->blcf"), "h_mlp", output_axes=_GATE_UP),
    "down": WeightUseSpec(_einsum("blf,fd->bld"), "hidden", input_axes=_MLP),
    # The weights outside the layers (``shardlib.models.transformer``): the lookup's input is the token ids.
    "embedding": WeightUseSpec(lambda ids, table: jnp.take(table, ids, axis=0), "tokens", ("batch", "length")),
    "final_norm": WeightUseSpec(lambda x, w: x * w.astype(x.dtype), "normed_final"),
    "unembed": WeightUseSpec(_logits("bld,dv->blv"), "head", output_axes=_VOCAB),
    "tied_unembed": WeightUseSpec(_logits("bld,vd->blv"), "head", output_axes=_VOCAB),
}

use_weight: WeightUse = PlainWeightUse(WEIGHT_USES)
"""The default ``WeightUse`` of ``decoder_block``: ``WEIGHT_USES[name].apply(x, w)`` (in x's dtype)."""


class WeightTap(parallel_weight_use.WeightTap):
    """``shardlib.parallel.weight_use.WeightTap`` over this module's ``WEIGHT_USES``."""

    def __init__(self, probes: dict[str, jax.Array] | None = None):
        super().__init__(WEIGHT_USES, probes)


def weight_grads(w: BlockWeights, inputs: dict[str, jax.Array], dys: dict[str, jax.Array]) -> BlockWeights:
    """One layer's weight gradients from a ``WeightTap``'s recorded inputs and the outputs' cotangents
    (``tapped_weight_grads``): the W half of a split backward."""
    return BlockWeights(**tapped_weight_grads(WEIGHT_USES, w._asdict(), inputs, dys))


class Llama3RopeScaling(NamedTuple):
    """``ModelConfig.rope_scaling`` as a hashable value (``shardlib.models.config.RopeScaling``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None) -> jax.Array:
    """float32 [K/2]: the rotary frequencies theta^(-2i/K), rescaled as Llama 3 does when ``scaling`` is given.

    Llama 3: a frequency of wavelength 2 pi / f above ``original / low_freq_factor``
    becomes f / factor, one below ``original / high_freq_factor`` stays f, one
    between is interpolated by s = (original / wavelength - low) / (high - low):
    (1 - s) f / factor + s f (``transformers``' ``_compute_llama3_parameters``).
    """
    inv_freq_k = theta ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    if scaling is None:
        return inv_freq_k
    factor, low, high, original = scaling
    wavelength_k = 2 * jnp.pi / inv_freq_k
    long_k = jnp.where(wavelength_k > original / low, inv_freq_k / factor, inv_freq_k)
    smooth_k = (original / wavelength_k - low) / (high - low)
    smoothed_k = (1 - smooth_k) * long_k / factor + smooth_k * long_k
    medium_k = (wavelength_k >= original / high) & (wavelength_k <= original / low)
    return jnp.where(medium_k, smoothed_k, long_k)


def apply_rope(
    x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float, scaling: Llama3RopeScaling | None = None
) -> jax.Array:
    """Rotary position embedding (rotate-half layout) applied per head.

    Pairs dimension i with i + K/2 and rotates each pair by positions * theta^(-2i/K)
    (those frequencies rescaled by ``scaling``: ``rope_frequencies``).
    Angles and the rotation run in float32: bf16 angles lose whole radians at
    long positions.
    """
    head_dim = x_BxLxHxK.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    inv_freq_k = rope_frequencies(head_dim, theta, scaling)
    angle_BxLxk = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_k
    # Broadcast over heads.
    sin_BxLx1xk = jnp.sin(angle_BxLxk)[:, :, None, :]
    cos_BxLx1xk = jnp.cos(angle_BxLxk)[:, :, None, :]
    x32_BxLxHxK = x_BxLxHxK.astype(jnp.float32)
    x1_BxLxHxk, x2_BxLxHxk = x32_BxLxHxK[..., :half], x32_BxLxHxK[..., half:]
    out_BxLxHxK = jnp.concatenate(
        [x1_BxLxHxk * cos_BxLx1xk - x2_BxLxHxk * sin_BxLx1xk, x2_BxLxHxk * cos_BxLx1xk + x1_BxLxHxk * sin_BxLx1xk],
        axis=-1,
    )
    return out_BxLxHxK.astype(x_BxLxHxK.dtype)


def causal_gqa_attention(
    q_BxLxHxK: jax.Array,
    k_BxMxNxK: jax.Array,
    v_BxMxNxK: jax.Array,
    q_positions_BxL: jax.Array,
    kv_positions_BxM: jax.Array,
) -> jax.Array:
    """Grouped-query causal attention; returns [B, L, H, K] in q's dtype.

    Query head h uses kv head h // G, so grouping q as [B, L, N, G, K] lets one
    einsum serve all G heads of a group without materialising repeated k/v.
    The mask compares positions rather than array indices, so a sequence
    permuted together with its positions (e.g. zig-zag order for ring
    attention) gives the same result, permuted. Scores and softmax are float32.
    The math is ``shardlib.parallel.dense_attention.gqa_attention``'s.
    """
    return gqa_attention(
        q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, is_causal=True, query_positions=q_positions_BxL, key_positions=kv_positions_BxM
    )


def sliding_window_attention(window: int) -> AttentionFn:
    """``causal_gqa_attention`` where a query at position p sees only keys at p - window + 1 .. p.

    As ``transformers``' sliding-window mask (Mistral): key position j is
    visible from query position i iff 0 <= i - j < window.
    """

    def attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, q_positions_BxL, kv_positions_BxM):
        distance_BxLxM = q_positions_BxL[:, :, None] - kv_positions_BxM[:, None, :]
        bias_Bx1xLxM = jnp.where(distance_BxLxM < window, 0.0, MASKED)[:, None]
        return gqa_attention(
            q_BxLxHxK,
            k_BxMxNxK,
            v_BxMxNxK,
            bias_Bx1xLxM,
            is_causal=True,
            query_positions=q_positions_BxL,
            key_positions=kv_positions_BxM,
        )

    return attend


def block_attention(attention: AttentionFn | None, sliding_window: int | None, length: int) -> AttentionFn:
    """The attention a decoder layer runs: ``attention`` (default ``causal_gqa_attention``) with the window.

    A window is applied by the dense attention only; another ``attention`` (a
    run's kernel: ring, all-gather, fused) applies none, so it is accepted
    only for blocks of at most ``sliding_window`` tokens, where the window
    cuts nothing. ValueError naming ``model.sliding_window`` otherwise.
    """
    if sliding_window is None:
        return attention or causal_gqa_attention
    if attention is None or attention is causal_gqa_attention:
        return sliding_window_attention(sliding_window)
    if length > sliding_window:
        raise ValueError(
            f"model.sliding_window={sliding_window} is shorter than the {length}-token sequence, and this run's "
            "attention kernel applies no sliding window: use sequences of at most sliding_window tokens "
            "(seq_len), where the window masks nothing, or the model's own dense attention"
        )
    return attention


def decoder_block(
    x_BxLxD: jax.Array,
    w: BlockWeights,
    positions_BxL: jax.Array,
    *,
    rope_theta: float,
    norm_eps: float,
    shard: ShardFn = no_shard,
    attention: AttentionFn | None = None,
    mlp: Callable[[jax.Array], jax.Array] | None = None,
    use: WeightUse = use_weight,
    rope_scaling: Llama3RopeScaling | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """One pre-norm decoder layer: x + attn(norm(x)), then + swiglu(norm(x)).

    ``mlp`` (normalised [B, L, D] -> [B, L, D]) replaces the SwiGLU MLP.
    ``use`` applies every weight (``WEIGHT_USES``); a ``WeightTap`` records them.
    ``w.qkv_bias`` (when not None) is added to the q/k/v projection's output;
    ``rope_scaling`` rescales the rotary frequencies; ``sliding_window``
    limits how far back a query sees (``block_attention``).

    Matmuls run in x's dtype (the compute dtype); weights are cast at use so
    they can be stored in a different param dtype. ``attention`` (default
    ``causal_gqa_attention``) is where a sequence-parallel kernel plugs in.
    """
    attention = block_attention(attention, sliding_window, x_BxLxD.shape[1])
    dtype = x_BxLxD.dtype

    h_BxLxD = use("attn_norm", rms_normalize(x_BxLxD, norm_eps), w.attn_norm).astype(dtype)
    # One matmul for q, k and v: one input gradient to reduce under tensor parallelism.
    qkv_BxLxNxSxK = use("qkv", h_BxLxD, w.qkv)
    if w.qkv_bias is not None:
        qkv_BxLxNxSxK = qkv_BxLxNxSxK + use("qkv_bias", h_BxLxD, w.qkv_bias)
    qkv_BxLxNxSxK = shard(qkv_BxLxNxSxK, ("batch", "length", "kv_heads", None, "head_dim"))
    q_BxLxHxK, k_BxLxNxK, v_BxLxNxK = split_qkv(qkv_BxLxNxSxK)
    q_BxLxHxK = shard(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    k_BxLxNxK = shard(k_BxLxNxK, ("batch", "length", "kv_heads", "head_dim"))
    v_BxLxNxK = shard(v_BxLxNxK, ("batch", "length", "kv_heads", "head_dim"))
    q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, rope_theta, rope_scaling)
    k_BxLxNxK = apply_rope(k_BxLxNxK, positions_BxL, rope_theta, rope_scaling)
    attn_BxLxHxK = attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, positions_BxL, positions_BxL)
    x_BxLxD = x_BxLxD + use("o", attn_BxLxHxK, w.o)

    h_BxLxD = use("mlp_norm", rms_normalize(x_BxLxD, norm_eps), w.mlp_norm).astype(dtype)
    if mlp is not None:  # e.g. a mixture of experts (shardlib.models.moe); w.gate_up/down are then unused
        return x_BxLxD + mlp(h_BxLxD)
    # One matmul for gate and up, as for q/k/v.
    gate_up_BxLx2xF = shard(use("gate_up", h_BxLxD, w.gate_up), ("batch", "length", None, "mlp"))
    gate_BxLxF, up_BxLxF = gate_up_BxLx2xF[:, :, 0], gate_up_BxLx2xF[:, :, 1]
    hidden_BxLxF = shard(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
    x_BxLxD = x_BxLxD + use("down", hidden_BxLxF, w.down)
    return x_BxLxD
