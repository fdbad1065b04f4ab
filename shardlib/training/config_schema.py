"""The training configuration's schema: one pydantic model per section of a run's YAML.

The ``model:`` section is :class:`shardlib.models.config.ModelConfig`, the model zoo's own.

Loading, ``key=value`` overrides and the error messages live in
:mod:`shardlib.training.config`, which re-exports these classes; import them from there.
"""

import dataclasses
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

# The model's section is the model zoo's own configuration (re-exported by shardlib.training.config).
from shardlib.models.config import STRICT as _STRICT
from shardlib.models.config import ModelConfig, NonNegFloat, NonNegInt, PosFloat, PosInt, UnitFloat

# Adam betas of exactly 1 would make the bias correction divide by zero.
Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerConfig(BaseModel):
    """AdamW with linear warmup and cosine decay to ``lr * min_lr_ratio``."""

    model_config = _STRICT

    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 20
    min_lr_ratio: UnitFloat = 0.1
    weight_decay: NonNegFloat = 0.1
    b1: Beta = 0.9
    b2: Beta = 0.95
    eps: PosFloat = 1e-8
    clip_norm: PosFloat = 1.0


class DataConfig(BaseModel):
    """Where training tokens come from: bundled stdlib sources, text files or token .bin files."""

    model_config = _STRICT

    source: Literal["stdlib", "text", "bin"] = "stdlib"
    paths: list[str] = []
    # Held out: the tail of the token stream (see shardlib.training.data).
    heldout_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.01
    # Text sources only: a `tokenizers` tokenizer.json, or a directory holding one (a Hugging Face
    # checkpoint), tokenizes the corpus; unset: byte-level tokens 0..255 (shardlib.training.data).
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _check_paths(self) -> "DataConfig":
        if self.source == "stdlib" and self.paths:
            raise ValueError("source 'stdlib' takes no data.paths; remove them or pick 'text'/'bin'")
        if self.source != "stdlib" and not self.paths:
            raise ValueError(f"source '{self.source}' needs at least one file in data.paths")
        return self


class CheckpointConfig(BaseModel):
    """How often checkpoints are written and how many are kept."""

    model_config = _STRICT

    every: NonNegInt = 100  # 0: only at the last step
    keep: PosInt = 3
    async_save: bool = True
    # A newest checkpoint that fails its checksum or cannot be read: false stops with an error
    # naming it; true resumes from the newest older one that restores (shardlib.training.checkpoint).
    fallback: bool = False


class FaultsConfig(BaseModel):
    """What a run does when a step goes bad or a peer process is lost (see shardlib.training.faults)."""

    model_config = _STRICT

    # stop: end the run naming the step, without checkpointing past the last good step;
    # skip: leave parameters and optimizer state as they were, count the step and go on.
    nan_policy: Literal["stop", "skip"] = "stop"
    # With nan_policy=skip: this many skipped steps in a row end the run like nan_policy=stop.
    max_consecutive_skips: PosInt = 10
    # A surviving process exits (status 4) at most this long after a peer process stops.
    peer_timeout_s: Annotated[float, Field(ge=2)] = 60.0
    # Rehearsal: feed out-of-vocabulary tokens at these steps, which the embedding turns into NaN.
    inject_nan_at: list[PosInt] = []
    # Loss-spike guard: a finite loss above spike_factor x the median of the last spike_window
    # steps' losses (once spike_warmup of them are known) ends the run, whatever nan_policy says,
    # before that state is saved; null: off. Healthy runs fall from ~ln(vocab) and never rise
    # anywhere near 4x their recent median; a diverging one does.
    spike_factor: Annotated[float, Field(gt=1)] | None = 4.0
    spike_window: PosInt = 50
    spike_warmup: PosInt = 5
    # The state an update makes is checked too, before it can be saved: a parameter norm that is not
    # finite, or more than max_norm_growth times the norm one update earlier, ends the run. One AdamW
    # update moves each weight by about lr, so a sound step changes the norm by a few percent at most.
    max_norm_growth: Annotated[float, Field(gt=1)] | None = 2.0

    @model_validator(mode="after")
    def _check_spike_window(self) -> "FaultsConfig":
        if self.spike_warmup > self.spike_window:
            raise ValueError(
                f"spike_warmup ({self.spike_warmup}) exceeds spike_window ({self.spike_window}): the window "
                "would never hold enough losses and the spike guard would never check"
            )
        return self


class PipelineConfig(BaseModel):
    """Pipeline parallelism over the mesh's ``pipe`` axis (used when pipe > 1)."""

    model_config = _STRICT

    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"] = "1f1b"
    microbatches: PosInt = 4
    virtual_stages: PosInt = 1  # chunks per device: > 1 with interleaved-1f1b, 2 with zb-v
    # cond: a stage computes only its own action (GPUs); select: every branch, then
    # choose (needed on XLA:CPU when `model` collectives run inside a stage).
    branching: Literal["auto", "cond", "select"] = "auto"
    # true: each backward recomputes its stage's forward from the stage input (keeps only
    # stage inputs); false: each forward keeps its residuals for its backward (a third less
    # matmul work, the plain model's activations per microbatch in flight; not zb-h1/zb-v).
    recompute: bool = True


class AttentionConfig(BaseModel):
    """Attention over the mesh's ``seq`` axis (shardlib.parallel.attention); dense keeps it to the compiler."""

    model_config = _STRICT

    # ring: K/V blocks rotate over `seq` (O(S/p) memory); allgather: every device gathers all K/V;
    # fused: jax.nn.dot_product_attention (cuDNN flash attention on GPUs in bf16), seq = 1 only.
    impl: Literal["dense", "fused", "ring", "allgather"] = "dense"
    # zigzag: device i holds chunks i and 2p-1-i of 2p, so causal work is equal on every device.
    load_balance: Literal["zigzag", "none"] = "zigzag"
    # ring: keys per inner block of a tile (scratch is linear in the local length).
    block_k: PosInt = 256


# Streaming DiLoCo's alpha where an overlapped outer step lands, when the config does not set outer.mixing.
OVERLAP_MIXING = 0.5


class OuterConfig(BaseModel):
    """Local SGD and DiLoCo across replica groups (``shardlib.parallel.diloco``); ``none``: synchronous.

    Each replica group (one index along ``replica_axes``) takes ``inner_steps`` inner
    optimizer steps on its own rows of the batch, with no collective over the
    replica axes; then the groups average their parameter change (one
    all-reduce) and an outer SGD applies it to the parameters the period
    started from. ``local_sgd`` is that with outer SGD at lr 1 and no momentum.
    """

    model_config = _STRICT

    algorithm: Literal["none", "diloco", "local_sgd"] = "none"
    # H: inner steps per outer step (not `every`, which stays checkpoint.every on the command line).
    inner_steps: PosInt = 36
    # The outer SGD's learning rate (diloco); not `lr`, so that `lr=...` stays optimizer.lr.
    learning_rate: PosFloat = 0.7
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # outer momentum (diloco); 0: none
    nesterov: bool = True
    # Mesh axes whose shards are the replica groups: batch axes (`expert` doubles as one for dense
    # models), so that each group trains on its own rows.
    replica_axes: list[Literal["data", "data_replica", "expert"]] = ["data"]
    # The pseudo-gradient's all-reduce, compressed with error feedback (shardlib.parallel.compression).
    compression: Literal["none", "bf16", "int8"] = "none"
    # Streaming DiLoCo: F fragments of the layers, one synced every inner_steps / F steps (F divides H).
    fragments: PosInt = 1
    # 1: each outer step's all-reduce runs beside the next inner step, in its program, and lands after
    # it (streaming DiLoCo's overlap, tau = 1); 0: the inner steps wait for it.
    overlap_steps: Annotated[int, Field(ge=0, le=1)] = 0
    # Where an outer step lands, each replica keeps this share of its own parameters (streaming DiLoCo's
    # alpha; 0: it restarts from the new anchor). Unset: 0.5 with overlap_steps 1, the paper's alpha for
    # tau = 1 (Douillard et al. 2025, Figs. 8 and 10), since at 0 every replica would throw away, on the
    # fragment, the inner step that ran beside the all-reduce; 0 without overlap (DiLoCo's restart).
    mixing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # The inner AdamW's moments averaged over the replicas at each outer step (one more all-reduce of
    # the pseudo-gradient's float32 bytes per moment): none, first (mu), both (mu and nu).
    average_moments: Literal["none", "first", "both"] = "none"

    @model_validator(mode="after")
    def _check_outer(self) -> "OuterConfig":
        if self.overlap_steps and "mixing" not in self.model_fields_set:
            self.mixing = OVERLAP_MIXING
        if len(set(self.replica_axes)) != len(self.replica_axes) or not self.replica_axes:
            raise ValueError(f"replica_axes must name each mesh axis once, at least one (got {self.replica_axes})")
        if self.inner_steps % self.fragments:
            raise ValueError(
                f"fragments={self.fragments} must divide inner_steps={self.inner_steps}: streaming DiLoCo syncs "
                "one fragment every inner_steps / fragments steps"
            )
        if self.average_moments != "none" and self.overlap_steps:
            raise ValueError(
                "average_moments with overlap_steps=1 is not built: the moments' all-reduce would wait for the "
                "inner step that updates them; use one of them"
            )
        # Compared with the defaults, not with what was written: a dumped config holds every key.
        given = {
            k
            for k in ("learning_rate", "momentum", "nesterov")
            if getattr(self, k) != type(self).model_fields[k].default
        }
        if self.algorithm == "local_sgd" and given:
            raise ValueError(
                f"local_sgd averages the replicas (outer SGD at lr 1, no momentum), so {', '.join(sorted(given))} "
                "has no meaning; use algorithm: diloco to set the outer optimizer"
            )
        return self


# Words a user may type for a setting the schema names otherwise, with every key each may stand for: such
# a word alone (``learning_rate=1e-3``) is ambiguous, the run's AdamW or DiLoCo's outer SGD, so an override
# must write the full name (shardlib.training.config). ``lr`` stays optimizer.lr.
WORD_SENSES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("optimizer.lr", "outer.learning_rate"),
    "compression": ("grad_compression", "outer.compression"),
    "momentum": ("optimizer.b1", "outer.momentum"),  # AdamW's first-moment decay, or the outer SGD's
}


@dataclasses.dataclass(frozen=True)
class ConditionalSection:
    """A section a run reads only when its switch turns it on: a leaf name alone that lands in it while it is
    off would change nothing, so an override by leaf name is refused then (the full name still sets it)."""

    prefix: str  # the section's dotted keys start with it
    switch: str  # the key that turns it on (itself always read)
    is_on: Callable[["Config"], bool]
    how: str  # an override that turns it on, for the error


CONDITIONAL_SECTIONS = (
    ConditionalSection("outer.", "outer.algorithm", lambda c: c.outer.algorithm != "none", "outer.algorithm=diloco"),
    ConditionalSection(
        "model.moe.", "model.moe.n_experts", lambda c: c.model.moe.n_experts > 0, "model.moe.n_experts=8"
    ),
)


class Config(BaseModel):
    """A complete training run."""

    model_config = _STRICT

    model: ModelConfig
    sharding: Literal["dp", "fsdp", "tp", "fsdp_tp", "hsdp", "hsdp_tp"] = "dp"  # presets in shardlib.core.rules.PRESETS
    mesh: str = "meshes/cpu-8.yaml"
    steps: PosInt = 200
    run_dir: str = "runs/default"
    seed: int = 0
    # A fresh run starts from these weights instead of random ones: hf:/path/to/dir, a Hugging Face
    # Llama checkpoint (shardlib.interop). A run_dir that holds checkpoints resumes them instead.
    init_from: Annotated[str, Field(pattern=r"^hf:.+")] | None = None
    batch_size: PosInt = 16
    seq_len: PosInt = 128
    grad_accum: PosInt = 1
    # Data-parallel gradient all-reduce: none (XLA's), or compressed with error feedback (shardlib.parallel.compression).
    grad_compression: Literal["none", "bf16", "int8"] = "none"
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    outer: OuterConfig = Field(default_factory=OuterConfig)
    log_every: PosInt = 10
    eval_every: NonNegInt = 50  # 0: evaluate only at the last step
    eval_batches: NonNegInt = 4  # held-out batches per evaluation; 0: no held-out evaluation at all
    peak_tflops: PosFloat | None = None

    @model_validator(mode="after")
    def _check_batch(self) -> "Config":
        if self.model.loss_chunk and self.seq_len % self.model.loss_chunk:
            raise ValueError(
                f"model.loss_chunk ({self.model.loss_chunk}) must divide seq_len ({self.seq_len}): "
                "the cross-entropy is taken in chunks of that many tokens of each sequence"
            )
        if self.model.reduce_dtype is not None and self.grad_compression != "none":
            raise ValueError(
                f"model.reduce_dtype={self.model.reduce_dtype} does not combine with grad_compression="
                f"{self.grad_compression}: the compressed reduction sets what the gradients carry"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum}): every microbatch holds batch_size // grad_accum sequences"
            )
        return self
