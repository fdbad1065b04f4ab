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

    n_experts: NonNegInt = 0
    top_k: Annotated[int, Field(ge=1, le=2)] = 2
    # Slots per expert per dispatch group: ceil(capacity_factor * tokens * top_k / n_experts).
    capacity_factor: PosFloat = 1.25
    # Layer i (from 0) is MoE when (i + 1) % period == 0: 2 = every other layer, 1 = all.
    period: PosInt = 2
    expert_d_ff: PosInt | None = None  # hidden width of each expert; default model.d_ff
    aux_loss_weight: NonNegFloat = 0.01
    z_loss_weight: NonNegFloat = 0.001


class RopeScaling(BaseModel):
    """Llama 3's rotary frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``).

    Frequencies whose wavelength exceeds ``original_max_position_embeddings /
    low_freq_factor`` are divided by ``factor``; those shorter than ``... /
    high_freq_factor`` are kept; the band between is interpolated smoothly
    (``shardlib.models.layers.rope_frequencies``).
    """

    model_config = STRICT

    rope_type: Literal["llama3"] = "llama3"
    factor: PosFloat
    low_freq_factor: PosFloat
    high_freq_factor: PosFloat
    original_max_position_embeddings: PosInt

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

    name: Literal["transformer"] = "transformer"
    vocab_size: PosInt = 256
    d_model: PosInt
    n_layers: PosInt
    n_heads: PosInt
    n_kv_heads: PosInt
    head_dim: PosInt | None = None
    d_ff: PosInt
    rope_theta: PosFloat = 10000.0
    rope_scaling: RopeScaling | None = None  # null: the plain rotary frequencies theta^(-2i/K)
    qkv_bias: bool = False  # a learned bias on q, k and v (Qwen 2): parameter layers/qkv_bias [L, N, G + 2, K]
    # Each query sees only the keys less than this many positions before it (Mistral); null: all earlier ones.
    sliding_window: PosInt | None = None
    tie_embeddings: bool = False
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # What the gradient reductions the step makes itself carry (per weight use, once per step with
    # grad_accum, a pipeline's): null = param_dtype. The precision policy in full: parameters and
    # optimizer state in param_dtype, matmuls in compute_dtype, logits, softmax and loss in float32,
    # gradient reductions in reduce_dtype (ParallelPlan.describe prints it).
    reduce_dtype: Literal["float32", "bfloat16"] | None = None
    remat: Literal["none", "full", "save_matmuls", "save_matmuls_attention"] = "none"
    # Cross-entropy in chunks of this many tokens of each sequence (shardlib.models.layers.chunked_cross_entropy):
    # the [batch, seq_len, vocab] float32 logits are never held whole, the backward recomputes each
    # chunk's. 0: off (the whole logits). Must divide seq_len, and each chunk over the mesh's seq axis.
    loss_chunk: NonNegInt = 0
    # Layers per iteration of the scan over layers (lax.scan's unroll): 1 keeps one loop body and
    # the smallest program; n_layers unrolls it whole, so XLA may fuse and schedule across layers.
    scan_unroll: PosInt = 1
    norm_eps: PosFloat = 1e-6
    init_std: PosFloat = 0.02
    moe: MoEConfig = Field(default_factory=MoEConfig)

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
