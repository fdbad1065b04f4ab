"""The model's own configuration: the shape and numerics of shardlib's transformer (``ModelConfig``).

It belongs to the model zoo (``shardlib.models``), not to training: the Hugging Face conversion
(``shardlib.interop``) maps ``config.json`` onto it without importing the training layer, and the
run config (``shardlib.training.config``, which re-exports both classes) holds one as its
``model:`` section. The field types (``PosInt`` ...) are shared with the training schema.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]

STRICT = ConfigDict(extra="forbid")  # every section refuses keys it does not know


class MoEConfig(BaseModel):
    """Mixture-of-experts MLPs (shardlib.models.moe); ``n_experts: 0`` keeps every MLP dense."""

    model_config = STRICT

    n_experts: NonNegInt = Field(0, description="experts per MoE layer; 0: every MLP is dense (no MoE layers)")
    top_k: Annotated[int, Field(ge=1, le=2)] = Field(2, description="experts each token is routed to")
    capacity_factor: PosFloat = Field(
        1.25, description="slots per expert per dispatch group: ceil(capacity_factor * tokens * top_k / n_experts)"
    )
    dispatch: Literal["capacity", "dropless"] = Field(
        "capacity",
        description="capacity: each expert takes at most capacity_factor's slots per group and drops the rest; "
        "dropless: every (token, choice) pair reaches its expert (sorted by expert, one grouped matmul)",
    )
    dropless_transport: Literal["auto", "ragged_all_to_all", "all_gather"] = Field(
        "auto",
        description="dropless over the expert axis: auto (ragged_all_to_all on GPU/TPU, all_gather on XLA:CPU, "
        "which lacks it), or force one",
    )
    period: PosInt = Field(
        2, description="layer i (from 0) is MoE when (i + 1) % period == 0: 2 = every other layer, 1 = all"
    )
    expert_d_ff: PosInt | None = Field(None, description="hidden width of each expert; null: model.d_ff")
    aux_loss_weight: NonNegFloat = Field(0.01, description="weight of the router's load-balancing loss in the loss")
    z_loss_weight: NonNegFloat = Field(
        0.001, description="weight of the router z-loss (its squared log-sum-exp), which keeps router logits small"
    )


class RopeScaling(BaseModel):
    """Llama 3's rotary frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``).

    Frequencies whose wavelength exceeds ``original_max_position_embeddings /
    low_freq_factor`` are divided by ``factor``; those shorter than ``... /
    high_freq_factor`` are kept; the band between is interpolated smoothly
    (``shardlib.models.layers.rope_frequencies``).
    """

    model_config = STRICT

    rope_type: Literal["llama3"] = Field("llama3", description="the scaling's kind (only llama3)")
    factor: PosFloat = Field(description="what the long wavelengths' frequencies are divided by")
    low_freq_factor: PosFloat = Field(description="wavelengths above original / low_freq_factor are scaled")
    high_freq_factor: PosFloat = Field(description="wavelengths below original / high_freq_factor are kept")
    original_max_position_embeddings: PosInt = Field(description="the context length the model was trained at")

    @model_validator(mode="after")
    def _check_band(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        return self


class ModelConfig(BaseModel):
    """Shape and numerics of the decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU)."""

    model_config = STRICT

    name: Literal["transformer"] = Field("transformer", description="the model: shardlib's decoder-only transformer")
    vocab_size: PosInt = Field(256, description="token ids the embedding holds (256: byte-level tokens)")
    d_model: PosInt = Field(description="width of the residual stream")
    n_layers: PosInt = Field(description="transformer layers")
    n_heads: PosInt = Field(description="query heads per attention layer")
    n_kv_heads: PosInt = Field(description="key/value heads (grouped-query attention); divides n_heads")
    head_dim: PosInt | None = Field(None, description="width of one head; null: d_model // n_heads")
    d_ff: PosInt = Field(description="hidden width of the SwiGLU MLP")
    rope_theta: PosFloat = Field(10000.0, description="base of the rotary position embeddings' frequencies")
    rope_scaling: RopeScaling | None = Field(
        None, description="Llama 3's rotary frequency scaling (rope_type llama3); null: the plain frequencies"
    )
    qkv_bias: bool = Field(
        False, description="a learned bias on q, k and v (Qwen 2): parameter layers/qkv_bias [L, N, G + 2, K]"
    )
    sliding_window: PosInt | None = Field(
        None,
        description="each query sees only the keys less than this many positions before it (Mistral); "
        "null: all earlier ones",
    )
    tie_embeddings: bool = Field(False, description="the output projection reuses the embedding matrix")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the parameters and the optimizer state"
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the matmuls (logits, softmax and loss are float32 always)"
    )
    reduce_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="what the gradient reductions the step makes itself carry (per weight use, once per step with "
        "grad_accum, a pipeline's); null: param_dtype. The precision policy in full: parameters and optimizer state "
        "in param_dtype, matmuls in compute_dtype, logits, softmax and loss in float32, gradient reductions in "
        "reduce_dtype (ParallelPlan.describe prints it)",
    )
    remat: Literal["none", "full", "save_matmuls", "save_matmuls_attention"] = Field(
        "none",
        description="what the backward pass recomputes: none keeps every activation, full recomputes each layer, "
        "save_matmuls keeps the matmul outputs, save_matmuls_attention also cuDNN's fused attention outputs",
    )
    loss_chunk: NonNegInt = Field(
        0,
        description="cross-entropy in chunks of this many tokens of each sequence "
        "(shardlib.models.layers.chunked_cross_entropy): the [batch, seq_len, vocab] float32 logits are never held "
        "whole, the backward recomputes each chunk's. 0: off (the whole logits). Must divide seq_len, and each "
        "chunk over the mesh's seq axis",
    )
    scan_unroll: PosInt = Field(
        1,
        description="layers per iteration of the scan over layers (lax.scan's unroll): 1 keeps one loop body and "
        "the smallest program; n_layers unrolls it whole, so XLA may fuse and schedule across layers",
    )
    norm_eps: PosFloat = Field(1e-6, description="epsilon of the RMSNorms")
    init_std: PosFloat = Field(0.02, description="standard deviation of the random initial weights")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="mixture-of-experts MLPs")

    @property
    def n_moe_layers(self) -> int:
        """How many layers have a mixture-of-experts MLP (0 for a dense model)."""
        return self.n_layers // self.moe.period if self.moe.n_experts else 0

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: ``head_dim`` if set, else ``d_model // n_heads``."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each key/value head is shared by a whole group of query heads"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            # Flooring would silently shrink the attention width; make the user choose.
            raise ValueError(
                f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set model.head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(
                f"head_dim ({self.resolved_head_dim}) must be even: rotary embeddings rotate pairs of channels"
            )
        moe = self.moe
        if moe.n_experts and self.n_layers % moe.period:
            raise ValueError(
                f"n_layers ({self.n_layers}) must be a multiple of moe.period ({moe.period}): "
                "layers are scanned in groups of period - 1 dense layers and one MoE layer"
            )
        if moe.n_experts and moe.top_k > moe.n_experts:
            raise ValueError(f"moe.top_k ({moe.top_k}) exceeds moe.n_experts ({moe.n_experts})")
        return self

    def num_params(self) -> int:
        """Exact parameter count: embedding, layers, final norm and untied output projection."""
        d, hd = self.d_model, self.resolved_head_dim
        # Fused qkv [D, N, H/N + 2, K] holds H + 2N heads' columns, o [H, K, D] H more.
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.d_ff  # SwiGLU: gate_up [D, 2, F], down [F, D]
        bias = hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        per_layer = 2 * d + attention + bias + mlp  # two RMSNorm scales, q/k/v biases if any
        embedding = self.vocab_size * d
        output = 0 if self.tie_embeddings else embedding
        return embedding + self.n_layers * per_layer + d + output + self._moe_extra_params(active=False)

    def _moe_extra_params(self, *, active: bool) -> int:
        """MoE layers' parameters beyond the dense MLPs they replace (all experts, or the top_k a token uses)."""
        if not self.moe.n_experts:
            return 0
        experts = self.moe.top_k if active else self.moe.n_experts
        expert_mlp = 3 * self.d_model * (self.moe.expert_d_ff or self.d_ff)
        router = self.d_model * self.moe.n_experts
        return self.n_moe_layers * (router + experts * expert_mlp - 3 * self.d_model * self.d_ff)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, as used for MFU.

        Dense part: 6 FLOPs per parameter that takes part in a matmul, i.e. every
        parameter except the embedding lookup (a gather), with the output projection
        counted even when it shares the embedding matrix. Attention scores and the
        weighted sum add ``12 * n_layers * n_heads * head_dim * seq_len``. This counts
        the full ``seq_len x seq_len`` score matrix although causal masking makes half
        of it unnecessary, following the MFU formula of PaLM (Chowdhery et al. 2022,
        appendix B) so that numbers are comparable with published ones.
        """
        d = self.d_model
        num_params = self.num_params()
        # Untied: drop the lookup table, keep the output matrix. Tied: the single
        # matrix is the output projection, so nothing is dropped.
        matmul_params = num_params if self.tie_embeddings else num_params - self.vocab_size * d
        if self.qkv_bias:  # added, not multiplied
            matmul_params -= self.n_layers * self.resolved_head_dim * (self.n_heads + 2 * self.n_kv_heads)
        # A token runs through top_k experts of each MoE layer, not all of them.
        matmul_params += self._moe_extra_params(active=True) - self._moe_extra_params(active=False)
        attention = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * seq_len
        return float(6 * matmul_params + attention)
