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

    lr: PosFloat = Field(3e-3, description="peak learning rate of AdamW, reached after warmup_steps")
    warmup_steps: NonNegInt = Field(20, description="steps of linear warmup from 0 to lr")
    min_lr_ratio: UnitFloat = Field(0.1, description="the cosine decay ends at lr * min_lr_ratio at the last step")
    weight_decay: NonNegFloat = Field(0.1, description="AdamW's decoupled weight decay")
    b1: Beta = Field(0.9, description="AdamW's decay of the first moment")
    b2: Beta = Field(0.95, description="AdamW's decay of the second moment")
    eps: PosFloat = Field(1e-8, description="AdamW's epsilon, added to the root of the second moment")
    clip_norm: PosFloat = Field(1.0, description="gradients are scaled down to this global norm when above it")


class DataConfig(BaseModel):
    """Where training tokens come from: bundled stdlib sources, text files or token .bin files."""

    model_config = _STRICT

    source: Literal["stdlib", "text", "bin"] = Field(
        "stdlib",
        description="stdlib: this Python's standard library as text; text: the files of paths; "
        "bin: pre-tokenized uint16 files",
    )
    paths: list[str] = Field([], description="files or directories of a text or bin source, in order")
    heldout_fraction: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.01, description="held out for evaluation: this tail of the token stream (see shardlib.training.data)"
    )
    tokenizer: str | None = Field(
        None,
        description="text sources only: a `tokenizers` tokenizer.json, or a directory holding one (a Hugging Face "
        "checkpoint), tokenizes the corpus (cached on disk, shardlib.training.token_cache); null: byte-level "
        "tokens 0..255",
    )

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

    every: NonNegInt = Field(100, description="save a checkpoint every this many steps; 0: only at the last step")
    keep: PosInt = Field(3, description="checkpoints kept; older ones are deleted once a newer one is complete")
    async_save: bool = Field(True, description="write checkpoints in the background while training goes on")
    fallback: bool = Field(
        False,
        description="a newest checkpoint that fails its checksum or cannot be read: false stops with an error "
        "naming it; true resumes from the newest older one that restores (shardlib.training.checkpoint)",
    )


class FaultsConfig(BaseModel):
    """What a run does when a step goes bad or a peer process is lost (see shardlib.training.faults)."""

    model_config = _STRICT

    nan_policy: Literal["stop", "skip"] = Field(
        "stop",
        description="a step with a NaN or Inf loss: stop ends the run naming the step, without checkpointing past "
        "the last good step; skip leaves parameters and optimizer state as they were, counts the step and goes on",
    )
    max_consecutive_skips: PosInt = Field(
        10, description="with nan_policy=skip: this many skipped steps in a row end the run like nan_policy=stop"
    )
    peer_timeout_s: Annotated[float, Field(ge=2)] = Field(
        60.0, description="a surviving process exits (status 4) at most this long after a peer process stops"
    )
    inject_nan_at: list[PosInt] = Field(
        [],
        description="rehearsal: feed out-of-vocabulary tokens at these steps, which the embedding turns into NaN",
    )
    spike_factor: Annotated[float, Field(gt=1)] | None = Field(
        4.0,
        description="loss-spike guard: a finite loss above spike_factor x the median of the last spike_window steps' "
        "losses (once spike_warmup of them are known) ends the run, whatever nan_policy says, before that state is "
        "saved; null: off. Healthy runs fall from ~ln(vocab) and never rise anywhere near 4x their recent median; "
        "a diverging one does",
    )
    spike_window: PosInt = Field(50, description="steps whose median loss the spike guard compares with")
    spike_warmup: PosInt = Field(5, description="losses the spike guard waits for before it checks")
    max_norm_growth: Annotated[float, Field(gt=1)] | None = Field(
        2.0,
        description="the state an update makes is checked too, before it can be saved: a parameter norm that is not "
        "finite, or more than max_norm_growth times the norm one update earlier, ends the run; null: off. One AdamW "
        "update moves each weight by about lr, so a sound step changes the norm by a few percent at most",
    )

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

    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"] = Field(
        "1f1b", description="the pipeline schedule (shardlib.parallel.pipeline)"
    )
    microbatches: PosInt = Field(4, description="microbatches each batch is split into on its way through the stages")
    virtual_stages: PosInt = Field(1, description="chunks of layers per device: > 1 with interleaved-1f1b, 2 with zb-v")
    branching: Literal["auto", "cond", "select"] = Field(
        "auto",
        description="cond: a stage computes only its own action (GPUs); select: every branch, then choose (needed "
        "on XLA:CPU when `model` collectives run inside a stage); auto: select on CPU when collectives run inside "
        "stages, else cond",
    )
    recompute: bool = Field(
        True,
        description="true: each backward recomputes its stage's forward from the stage input (keeps only stage "
        "inputs); false: each forward keeps its residuals for its backward (a third less matmul work, the plain "
        "model's activations per microbatch in flight; split tables, 1f1b's then among them, run B and W as units "
        "of one forward's cost; not zb-h1/zb-v with an MoE model)",
    )


class AttentionConfig(BaseModel):
    """Attention over the mesh's ``seq`` axis (shardlib.parallel.attention); dense keeps it to the compiler."""

    model_config = _STRICT

    impl: Literal["dense", "fused", "ring", "allgather", "ulysses"] = Field(
        "dense",
        description="dense: left to the compiler; ring: K/V blocks rotate over `seq` (O(S/p) memory); allgather: "
        "every device gathers all K/V; ulysses: all-to-alls over `seq` trade the sequence split for a head split "
        "(heads per device must split over the degree); fused: jax.nn.dot_product_attention (cuDNN flash attention "
        "on GPUs in bf16), seq = 1 only",
    )
    ulysses_degree: PosInt | None = Field(
        None,
        description="ulysses: the all-to-all group size, dividing `seq` (null: all of `seq`); below `seq` the ring "
        "runs across the seq/degree groups (the hybrid, 'unified sequence parallelism')",
    )
    ulysses_kernel: Literal["dense", "fused"] = Field(
        "dense",
        description="ulysses over all of `seq`: the kernel on whole sequences (fused: jax.nn.dot_product_attention)",
    )
    load_balance: Literal["zigzag", "none"] = Field(
        "zigzag",
        description="zigzag: device i holds chunks i and 2p-1-i of 2p, so causal work is equal on every device",
    )
    block_k: PosInt = Field(
        256, description="ring: keys per inner block of a tile (scratch is linear in the local length)"
    )


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

    algorithm: Literal["none", "diloco", "local_sgd"] = Field(
        "none", description="none: synchronous training; diloco: outer SGD with momentum; local_sgd: plain averaging"
    )
    inner_steps: PosInt = Field(
        36, description="H: inner steps per outer step (not `every`, which stays checkpoint.every)"
    )
    learning_rate: PosFloat = Field(
        0.7, description="the outer SGD's learning rate (diloco); not `lr`, so that `lr=...` stays optimizer.lr"
    )
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="outer momentum (diloco); 0: none")
    nesterov: bool = Field(True, description="the outer momentum is Nesterov's (diloco)")
    replica_axes: list[Literal["data", "data_replica", "expert"]] = Field(
        ["data"],
        description="mesh axes whose shards are the replica groups: batch axes (`expert` doubles as one for dense "
        "models), so that each group trains on its own rows",
    )
    compression: Literal["none", "bf16", "int8"] = Field(
        "none",
        description="the pseudo-gradient's all-reduce, compressed with error feedback (shardlib.parallel.compression)",
    )
    fragments: PosInt = Field(
        1,
        description="streaming DiLoCo: F fragments of the layers, one synced every inner_steps / F steps (F divides H)",
    )
    overlap_steps: Annotated[int, Field(ge=0, le=1)] = Field(
        0,
        description="1: each outer step's all-reduce runs beside the next inner step, in its program, and lands "
        "after it (streaming DiLoCo's overlap, tau = 1); 0: the inner steps wait for it",
    )
    mixing: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description="where an outer step lands, each replica keeps this share of its own parameters (streaming "
        "DiLoCo's alpha; 0: it restarts from the new anchor). Unset: 0.5 with overlap_steps 1, the paper's alpha "
        "for tau = 1 (Douillard et al. 2025, Figs. 8 and 10), since at 0 every replica would throw away, on the "
        "fragment, the inner step that ran beside the all-reduce; 0 without overlap (DiLoCo's restart)",
    )
    average_moments: Literal["none", "first", "both"] = Field(
        "none",
        description="the inner AdamW's moments averaged over the replicas at each outer step (one more all-reduce "
        "of the pseudo-gradient's float32 bytes per moment): none, first (mu), both (mu and nu)",
    )

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

    model: ModelConfig = Field(description="the model's shape and numerics")
    sharding: Literal["dp", "fsdp", "tp", "fsdp_tp", "hsdp", "hsdp_tp"] = Field(
        "dp", description="the sharding preset: rules from logical axes to mesh axes (shardlib.core.rules.PRESETS)"
    )
    mesh: str = Field("meshes/cpu-8.yaml", description="mesh YAML used when --mesh is not given")
    steps: PosInt = Field(200, description="optimizer steps of the whole run (a resumed run stops there too)")
    run_dir: str = Field(
        "runs/default", description="the run's directory: checkpoints, metrics, config record; a start resumes it"
    )
    seed: int = Field(0, description="seed of the initial weights and of the data order")
    init_from: Annotated[str, Field(pattern=r"^hf:.+")] | None = Field(
        None,
        description="a fresh run starts from these weights instead of random ones: hf:/path/to/dir, a Hugging Face "
        "Llama checkpoint (shardlib.interop). A run_dir that holds checkpoints resumes them instead",
    )
    batch_size: PosInt = Field(16, description="sequences per optimizer step (the global batch)")
    seq_len: PosInt = Field(128, description="tokens per sequence")
    grad_accum: PosInt = Field(
        1, description="microbatches per step, accumulated inside the jitted step; divides batch_size"
    )
    grad_compression: Literal["none", "bf16", "int8"] = Field(
        "none",
        description="data-parallel gradient all-reduce: none (XLA's), or compressed with error feedback "
        "(shardlib.parallel.compression)",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and its schedule")
    data: DataConfig = Field(default_factory=DataConfig, description="where the tokens come from")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="what a run does about bad steps")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="pipeline parallelism")
    attention: AttentionConfig = Field(default_factory=AttentionConfig, description="attention over seq")
    outer: OuterConfig = Field(default_factory=OuterConfig, description="DiLoCo and local SGD")
    log_every: PosInt = Field(10, description="log the loss and throughput every this many steps")
    eval_every: NonNegInt = Field(50, description="evaluate on held-out data every this many steps; 0: at the end")
    eval_batches: NonNegInt = Field(4, description="held-out batches per evaluation; 0: no held-out evaluation at all")
    peak_tflops: PosFloat | None = Field(
        None, description="the device's peak TFLOP/s for the MFU in the logs; null: looked up from the device kind"
    )

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
        window = self.model.sliding_window
        if window is not None and self.seq_len > window:
            raise ValueError(
                f"model.sliding_window={window} is shorter than seq_len ({self.seq_len}), and the training step's "
                "attention kernels (dense, fused, ring, all-gather) apply no sliding window: train on sequences of "
                "at most sliding_window tokens, where the window masks nothing"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum}): every microbatch holds batch_size // grad_accum sequences"
            )
        return self
