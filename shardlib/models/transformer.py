"""Decoder-only transformer in Flax NNX with stacked, scanned layers.

Every parameter carries logical axis names in its `out_sharding` metadata; the
mapping from logical names to mesh axes belongs to the caller, so nothing here
knows about meshes. Per-layer parameters are stored stacked along a leading
`layers` dimension and applied with `jax.lax.scan`, so the compiled program
contains one layer body regardless of depth.

Parameter paths (as flattened by `nnx.state(model, nnx.Param)`):
  embed/embedding [V, D]             ("vocab", "embed")
  layers/attn_norm, mlp_norm [L, D]  ("layers", "embed")
  layers/qkv [L, D, N, G + 2, K]     ("layers", "embed", "kv_heads", None, "head_dim")
  layers/o [L, H, K, D]              ("layers", "heads", "head_dim", "embed")
  layers/gate_up [L, D, 2, F]        ("layers", "embed", None, "mlp")
  layers/down [L, F, D]              ("layers", "mlp", "embed")
  layers/qkv_bias [L, N, G + 2, K]   ("layers", "kv_heads", None, "head_dim")   only if qkv_bias
  final_norm [D]                     ("embed",)
  unembed [D, V]                     ("embed", "vocab")   only if not tie_embeddings
  moe/router, gate, up, down         only with moe.n_experts > 0 (shardlib.models.moe.MoEStack)
(Here L is the number of layers; in activations L is the sequence length.)

q, k and v are one fused weight, and so are gate and up (``shardlib.models.layers``
says why: one all-reduce of the input gradient each under tensor
parallelism). ``qkv[:, :, n, :G]`` are the queries of kv head n (query head
h = n * G + g), ``qkv[:, :, n, G]`` its key and ``qkv[:, :, n, G + 1]`` its
value; ``gate_up[:, :, 0]`` is gate, ``gate_up[:, :, 1]`` up. The ``None``
dimensions are never split: a device holding kv head n holds all its slots.
Hugging Face checkpoints keep the five separate (``shardlib.interop``), and
checkpoints saved before the fusion are converted on restore
(``shardlib.training.fused_projections``).

With mixture of experts, every moe.period-th layer's MLP is a MoE: layers/gate_up
and down then stack only the dense layers' MLPs, and the layers are scanned in
groups of period - 1 dense layers and one MoE layer (``run_moe_layers``,
``shardlib.models.moe_layers``); remat policies are ``shardlib.models.remat``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from shardlib.models.layers import (
    AttentionFn,
    BlockWeights,
    Llama3RopeScaling,
    ShardFn,
    WeightTap,
    WeightUse,
    chunked_cross_entropy,
    cross_entropy,
    decoder_block,
    fuse_gate_up,
    fuse_qkv,
    no_shard,
    normal_init,
    rms_normalize,
    use_weight,
)
from shardlib.models.moe import (
    ExpertDispatch,
    MoEStack,
    MoEStats,
    MoEWeights,
    TokenMean,
    checked_dispatch,
    mean_over_tokens,
)
from shardlib.models.moe_layers import scan_moe_groups
from shardlib.models.remat import REMAT_CHOICES, rematerialize

__all__ = ["WEIGHT_PARAMS", "ShardFn", "Transformer", "no_shard"]

# Which parameter each weight use (``shardlib.models.layers.WEIGHT_USES``) reads, by path in the
# parameter tree; a ``layers/...`` parameter is stacked and each use sees one layer of it.
WEIGHT_PARAMS: dict[str, tuple[str, ...]] = {
    **{name: ("layers", name) for name in BlockWeights._fields},
    "embedding": ("embed", "embedding"),
    "tied_unembed": ("embed", "embedding"),
    "final_norm": ("final_norm",),
    "unembed": ("unembed",),
}


class Embedding(nnx.Module):
    """Token embedding table, also used as the output projection when tied."""

    def __init__(self, vocab_size: int, d_model: int, *, std: float, dtype: Any, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            normal_init(rngs.params(), (vocab_size, d_model), std, dtype),
            out_sharding=("vocab", "embed"),
        )

    def __call__(self, tokens_BxL: jax.Array, dtype: Any, use: WeightUse = use_weight) -> jax.Array:
        """[B, L] int token ids -> [B, L, D] embeddings in `dtype`."""
        return use("embedding", tokens_BxL, self.embedding[...]).astype(dtype)

    def attend(self, x_BxLxD: jax.Array, use: WeightUse = use_weight) -> jax.Array:
        """Tied output projection: [B, L, D] -> float32 logits [B, L, V]."""
        return use("tied_unembed", x_BxLxD, self.embedding[...])


_QKV_BIAS_AXES = ("layers", "kv_heads", None, "head_dim")


class LayerStack(nnx.Module):
    """All decoder layers' parameters, each kind stacked along a leading layer axis."""

    def __init__(self, cfg: Any, *, dtype: Any, rngs: nnx.Rngs):
        n_layers, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
        h, n, k = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        std = cfg.init_std
        # Output projections write into the residual stream once per sublayer;
        # shrinking them keeps the residual variance from growing with depth.
        out_std = std / math.sqrt(2 * n_layers)

        # MoE layers keep their MLP in shardlib.models.moe.MoEStack: these are the dense layers' MLPs.
        n_mlp = n_layers - getattr(cfg, "n_moe_layers", 0)

        def draw(shape, scale=std, count=n_layers):
            return normal_init(rngs.params(), (count, *shape), scale, dtype)

        def matrix(shape, names, scale=std, count=n_layers):
            return nnx.Param(draw(shape, scale, count), out_sharding=("layers", *names))

        def norm_scale():
            return nnx.Param(jnp.ones((n_layers, d), dtype), out_sharding=("layers", "embed"))

        # The fused weights (shardlib.models.layers.BlockWeights) are drawn as their parts, in the order and
        # with the keys the separate q, k, v, o, gate, up, down had: a seed gives the same initial
        # network as before the fusion (every part N(0, std^2)), only laid out fused.
        w_q, w_k, w_v = draw((d, h, k)), draw((d, n, k)), draw((d, n, k))
        self.attn_norm = norm_scale()
        self.qkv = nnx.Param(fuse_qkv(w_q, w_k, w_v), out_sharding=("layers", "embed", "kv_heads", None, "head_dim"))
        self.o = matrix((h, k, d), ("heads", "head_dim", "embed"), out_std)
        self.mlp_norm = norm_scale()
        gate_up = fuse_gate_up(draw((d, f), count=n_mlp), draw((d, f), count=n_mlp)) if n_mlp else None
        self.gate_up = nnx.Param(gate_up, out_sharding=("layers", "embed", None, "mlp")) if n_mlp else None
        self.down = matrix((f, d), ("mlp", "embed"), out_std, count=n_mlp) if n_mlp else None
        # Zero, as transformers initialises a Linear's bias for Qwen 2; no random draw, so the other
        # parameters keep a bias-free model's values.
        self.qkv_bias = (
            nnx.Param(jnp.zeros(self.qkv.shape[:1] + self.qkv.shape[2:], dtype), out_sharding=_QKV_BIAS_AXES)
            if getattr(cfg, "qkv_bias", False)
            else None
        )

    def weights(self) -> BlockWeights:
        """The stacked arrays, each with a leading [n_layers] axis for `lax.scan` (MLPs: [n dense layers])."""
        # None only for the weights this model lacks (gate_up and down without dense MLPs, qkv_bias).
        return BlockWeights(
            **{name: None if (v := getattr(self, name)) is None else v[...] for name in BlockWeights._fields}  # type: ignore[arg-type]
        )


class Transformer(nnx.Module):
    """Decoder-only LM: embed -> n_layers x (attention, SwiGLU) -> RMSNorm -> logits.

    Reads from `cfg`: vocab_size, d_model, n_layers, n_heads, n_kv_heads,
    resolved_head_dim, d_ff, rope_theta, tie_embeddings, param_dtype,
    compute_dtype, remat, norm_eps, init_std, and moe / n_moe_layers,
    rope_scaling, qkv_bias, sliding_window, scan_unroll and loss_chunk when
    present (``loss_chunk`` > 0: ``loss`` computes the cross-entropy in chunks
    of that many tokens, ``chunked_cross_entropy``).
    """

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        if cfg.remat not in REMAT_CHOICES:
            raise ValueError(f"unknown remat {cfg.remat!r}; expected one of {', '.join(REMAT_CHOICES)}")
        # Only hashable scalars are kept: static module attributes end up in the
        # graphdef, which jit hashes (a pydantic config is unhashable).
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.rope_theta = float(cfg.rope_theta)
        self.norm_eps = float(cfg.norm_eps)
        scaling = getattr(cfg, "rope_scaling", None)
        self.rope_scaling = None if scaling is None else Llama3RopeScaling(**scaling.model_dump(exclude={"rope_type"}))
        window = getattr(cfg, "sliding_window", None)
        self.sliding_window = None if window is None else int(window)
        self.remat = cfg.remat
        self.scan_unroll = int(getattr(cfg, "scan_unroll", 1) or 1)
        self.loss_chunk = int(getattr(cfg, "loss_chunk", 0) or 0)
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=param_dtype, rngs=rngs)
        self.layers = LayerStack(cfg, dtype=param_dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), param_dtype), out_sharding=("embed",))
        if cfg.tie_embeddings:
            self.unembed = None
        else:
            self.unembed = nnx.Param(
                normal_init(rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.init_std, param_dtype),
                out_sharding=("embed", "vocab"),
            )
        # Mixture of experts: every moe.period-th layer's MLP (shardlib.models.moe); created
        # last so that the other parameters get the same values as a dense model's.
        moe: Any = getattr(cfg, "moe", None)  # cfg's moe section (MoEConfig-like), if any
        has_moe = moe is not None and moe.n_experts > 0
        self.moe = MoEStack(cfg.n_moe_layers, cfg, dtype=param_dtype, rngs=rngs) if has_moe else None
        if has_moe:
            self.moe_period = int(moe.period)
            self.moe_top_k = int(moe.top_k)
            self.moe_capacity_factor = float(moe.capacity_factor)
            self.moe_dispatch = str(getattr(moe, "dispatch", "capacity"))
            self.moe_transport = str(getattr(moe, "dropless_transport", "auto"))
            self.moe_loss_weights = (float(moe.aux_loss_weight), float(moe.z_loss_weight))

    def __call__(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
        experts: ExpertDispatch | None = None,
        use: WeightUse = use_weight,
    ) -> jax.Array:
        """[B, L] token ids -> float32 logits [B, L, V].

        `positions_BxL` (default: 0..L-1 for every row) drives both the rotary
        embedding and the causal mask, so callers may reorder the sequence as
        long as they pass matching positions. `shard` constrains activations at
        layer boundaries by logical axis names. `attention` replaces the dense
        causal attention (e.g. ring attention from `shardlib.parallel.attention`);
        `experts` moves MoE tokens to their experts (default: all local);
        `use` applies every weight (``shardlib.models.layers.WEIGHT_USES``), e.g. one
        whose backward reduces the weight gradients itself
        (``shardlib.parallel.reduction``).
        """
        return self.forward(
            tokens_BxL, positions_BxL=positions_BxL, shard=shard, attention=attention, experts=experts, use=use
        )[0]

    def forward(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
        experts: ExpertDispatch | None = None,
        use: WeightUse = use_weight,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(logits [B, L, V], extra loss, metrics): what training needs besides the logits.

        Dense model: extra loss 0, no metrics. MoE: the extra loss is
        aux_loss_weight * load-balancing loss + z_loss_weight * router z-loss,
        each averaged over the MoE layers; metrics are those two averages
        (``moe_aux_loss``, ``moe_z_loss``) and ``moe_dropped_fraction``, the
        fraction of (token, choice) pairs past capacity over all MoE layers.
        """
        x_BxLxD, extra_loss, metrics = self.hidden(
            tokens_BxL, positions_BxL=positions_BxL, shard=shard, attention=attention, experts=experts, use=use
        )
        return self.logits(x_BxLxD, shard=shard, use=use), extra_loss, metrics

    def hidden(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
        experts: ExpertDispatch | None = None,
        use: WeightUse = use_weight,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(residual stream [B, L, D] after the last layer, extra loss, metrics): ``forward`` before ``logits``."""
        x_BxLxD = self.embed_tokens(tokens_BxL, shard=shard, use=use)
        if self.moe is None:
            x_BxLxD = self.run_layers(
                self.layers.weights(), x_BxLxD, positions_BxL=positions_BxL, shard=shard, attention=attention, use=use
            )
            return x_BxLxD, jnp.zeros((), jnp.float32), {}
        x_BxLxD, stats = self.run_moe_layers(
            self.layers.weights(),
            self.moe.weights(),
            x_BxLxD,
            positions_BxL=positions_BxL,
            shard=shard,
            attention=attention,
            experts=experts,
            use=use,
        )
        batch, length = tokens_BxL.shape
        aux_loss, z_loss = jnp.mean(stats.aux_loss), jnp.mean(stats.z_loss)
        pairs = stats.dropped.shape[0] * batch * length * self.moe_top_k
        metrics = {
            "moe_aux_loss": aux_loss,
            "moe_z_loss": z_loss,
            "moe_dropped_fraction": jnp.sum(stats.dropped) / pairs,
        }
        aux_weight, z_weight = self.moe_loss_weights
        return x_BxLxD, aux_weight * aux_loss + z_weight * z_loss, metrics

    # The three pieces below are what a pipeline places on different devices:
    # embedding on the first stage, slices of the layer stack on every stage,
    # the output head on the last.

    def embed_tokens(
        self, tokens_BxL: jax.Array, *, shard: ShardFn = no_shard, use: WeightUse = use_weight
    ) -> jax.Array:
        """[B, L] token ids -> residual stream [B, L, D] in the compute dtype."""
        return shard(self.embed(tokens_BxL, self.compute_dtype, use), ("batch", "length", "embed"))

    def run_layers(
        self,
        weights: BlockWeights,
        x_BxLxD: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
        use: WeightUse = use_weight,
    ) -> jax.Array:
        """Applies the layers whose stacked weights are given ([n, ...] each, any n) in order."""
        block, positions_BxL = self._block(x_BxLxD, positions_BxL, shard, attention, use)

        def scan_body(x_BxLxD, w):
            x_BxLxD = block(x_BxLxD, w, positions_BxL)
            return shard(x_BxLxD, ("batch", "length", "embed")), None

        x_BxLxD, _ = jax.lax.scan(rematerialize(scan_body, self.remat), x_BxLxD, weights, unroll=self.scan_unroll)
        return x_BxLxD

    def run_layers_tapped(
        self,
        weights: BlockWeights,
        x_BxLxD: jax.Array,
        probes: dict[str, jax.Array] | None = None,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
        """``run_layers`` through a ``WeightTap`` per layer, for a backward split into input and weight gradients.

        ``probes``: {weight name: [n, *that use's output shape]} added to each
        use's output. Returns (x_BxLxD, inputs, outputs): each use's input
        {input name: [n, ...]}, stacked over the n layers, and without probes
        each use's output {weight name: [n, ...]} (the probes' shapes; {} with them).
        """
        block, positions_BxL = self._block(x_BxLxD, positions_BxL, shard, attention)

        def scan_body(x_BxLxD, layer):
            w, layer_probes = layer
            tap = WeightTap(layer_probes)
            x_BxLxD = block(x_BxLxD, w, positions_BxL, use=tap)
            return shard(x_BxLxD, ("batch", "length", "embed")), (tap.inputs, tap.outputs)

        x_BxLxD, (inputs, outputs) = jax.lax.scan(
            rematerialize(scan_body, self.remat), x_BxLxD, (weights, probes), unroll=self.scan_unroll
        )
        return x_BxLxD, inputs, outputs

    def run_moe_layers(
        self,
        weights: BlockWeights,
        moe_weights: MoEWeights,
        x_BxLxD: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
        experts: ExpertDispatch | None = None,
        use: WeightUse = use_weight,
        token_mean: TokenMean = mean_over_tokens,
    ) -> tuple[jax.Array, MoEStats]:
        """Applies all layers of an MoE model: a scan over groups of period - 1 dense layers and one MoE layer.

        ``weights`` holds attention and norms of all layers [n_layers, ...] and
        the dense layers' MLPs [n_layers - M, ...]; ``moe_weights`` the MoE
        layers' router and experts [M, ...]. Returns the residual stream and
        the per-layer ``MoEStats`` stacked [M]. ``token_mean``: the router
        losses' mean over the batch (``shardlib.models.moe.TokenMean``).
        """
        x_BxLxD, (stats, _, _) = self._scan_moe_groups(
            weights, moe_weights, x_BxLxD, None, positions_BxL, shard, attention, experts, token_mean, use
        )
        return x_BxLxD, stats

    def _scan_moe_groups(
        self,
        weights,
        moe_weights,
        x_BxLxD,
        probes,
        positions_BxL,
        shard,
        attention,
        experts,
        token_mean,
        use=use_weight,
    ):
        """``shardlib.models.moe_layers.scan_moe_groups`` with this model's block, period, routing and remat."""
        experts = checked_dispatch(experts, self.moe_dispatch)
        block, positions_BxL = self._block(x_BxLxD, positions_BxL, shard, attention, use)
        return scan_moe_groups(
            block,
            weights,
            moe_weights,
            x_BxLxD,
            probes,
            positions_BxL=positions_BxL,
            shard=shard,
            period=self.moe_period,
            top_k=self.moe_top_k,
            capacity_factor=self.moe_capacity_factor,
            remat=self.remat,
            unroll=self.scan_unroll,
            experts=experts,
            token_mean=token_mean,
        )

    def run_moe_layers_tapped(
        self,
        weights: BlockWeights,
        moe_weights: MoEWeights,
        x_BxLxD: jax.Array,
        probes: dict | None = None,
        *,
        positions_BxL: jax.Array | None = None,
        shard: ShardFn = no_shard,
        attention: AttentionFn | None = None,
        experts: ExpertDispatch | None = None,
        token_mean: TokenMean = mean_over_tokens,
    ) -> tuple[jax.Array, MoEStats, dict, dict]:
        """``run_moe_layers`` for a backward split into input and weight gradients (``run_layers_tapped``).

        Every layer's weight uses go through a ``WeightTap``; the MoE weights
        (router and experts), whose uses are not in ``WEIGHT_USES``, get their
        probe added to the weight itself, so the probe's cotangent is the
        weight's gradient (computed with the input gradient, not deferred).
        ``probes``: {"uses": {weight name: [count, *output]}, "moe": MoEWeights of
        [M, ...]}, count the layers that use the weight (n, or n - M for the
        MLP's). Returns (x, stats, inputs {input name: [count, ...]}, outputs):
        without probes, the probes' shapes ({} with them).
        """
        x_BxLxD, (stats, inputs, outputs) = self._scan_moe_groups(
            weights, moe_weights, x_BxLxD, probes or {}, positions_BxL, shard, attention, experts, token_mean
        )
        if probes is None:
            outputs = {"uses": outputs, "moe": moe_weights}
        return x_BxLxD, stats, inputs, {} if probes is not None else outputs

    def _block(self, x_BxLxD, positions_BxL, shard, attention, use=use_weight):
        """(one decoder layer as ``block(x, weights, positions, mlp=None)``, the positions: 0..L-1 by default)."""
        batch, length = x_BxLxD.shape[:2]
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        block = functools.partial(
            decoder_block,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            shard=shard,
            attention=attention,
            use=use,
            rope_scaling=self.rope_scaling,
            sliding_window=self.sliding_window,
        )
        return block, positions_BxL

    def logits(self, x_BxLxD: jax.Array, *, shard: ShardFn = no_shard, use: WeightUse = use_weight) -> jax.Array:
        """Residual stream [B, L, D] -> float32 logits [B, L, V] (final norm, output projection)."""
        x_BxLxD = use("final_norm", rms_normalize(x_BxLxD, self.norm_eps), self.final_norm[...]).astype(x_BxLxD.dtype)
        if self.unembed is None:
            logits_BxLxV = self.embed.attend(x_BxLxD, use)
        else:
            logits_BxLxV = use("unembed", x_BxLxD, self.unembed[...])
        return shard(logits_BxLxV, ("batch", "length", "vocab"))

    def loss(
        self, x_BxLxD: jax.Array, targets_BxL: jax.Array, *, shard: ShardFn = no_shard, use: WeightUse = use_weight
    ) -> jax.Array:
        """Mean cross-entropy (float32 scalar) of the head on residual stream [B, L, D] against [B, L] targets.

        ``loss_chunk`` 0: ``cross_entropy(logits(x_BxLxD), targets_BxL)``; else
        ``chunked_cross_entropy`` over chunks of ``loss_chunk`` tokens, the same
        value and gradients without the whole [B, L, V] float32 logits. The
        chunks' head applies its weights the default way, not by ``use``: a
        use that reduces its weight gradient would do so once per chunk.
        """
        if not self.loss_chunk:
            return cross_entropy(self.logits(x_BxLxD, shard=shard, use=use), targets_BxL)
        return chunked_cross_entropy(
            x_BxLxD, targets_BxL, functools.partial(self.logits, shard=shard), self.loss_chunk, shard=shard
        )
