"""One plan for how a step runs on a mesh, built once from (config, mesh).

``build_plan`` reads the config and the mesh, checks the features against the
compatibility table (``shardlib.parallel.compat``), and resolves every decision the
strategies need: the rule table and batch sharding, the attention function
and token order, the expert dispatch, the pipeline's compiled schedule and
branching, gradient compression, accumulation and remat; and for DiLoCo or
local SGD (``outer``), the replica groups and the plan of one of them. The train step, the
eval step, ``describe``, the report and the planner take this plan; nothing
else re-derives those decisions, so what runs, what is evaluated, what is
printed and what is predicted cannot drift apart.

The strategies themselves (``shardlib.parallel.attention``, ``experts``, ``pipeline``,
``compression``) take arrays, functions and small typed settings, and never
see the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from shardlib.core.rules import (
    Rules,
    ShardingError,
    axes_tuple,
    check_mesh_fits_intent,
    preset_rules,
    rule_axes,
    without_axes,
)
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel import compat
from shardlib.parallel.attention import AttentionPlan, make_attention
from shardlib.parallel.diloco import OuterSettings, replica_count
from shardlib.parallel.dropless_experts import describe_dispatch, dropless_dispatch
from shardlib.parallel.expert_routing import ExpertDispatch
from shardlib.parallel.experts import check_experts_divide, expert_dispatch
from shardlib.parallel.pipeline.plan import PipelinePlan, PipelineSettings, logical_layers, plan_pipeline
from shardlib.parallel.ulysses_attention import kv_repeats
from shardlib.training.config import Config

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Precision:
    """The run's precision policy: what each kind of value is held, computed or sent in.

    params: parameters and optimizer state (``model.param_dtype``); compute: the matmuls and
    activations (``model.compute_dtype``); output: the logits, softmax and loss (always float32:
    a bf16 log-softmax over a large vocabulary loses the loss's low bits); reduce: what the
    gradient reductions the step makes itself carry (``model.reduce_dtype``, default the
    parameters'): per weight use, once per step with accumulation, a pipeline's. The
    partitioner's own (a mixture of experts' router and experts, DiLoCo's inner steps) and the
    compressed reduction (``grad_compression``, which refuses ``model.reduce_dtype``) carry their own.
    """

    params: str = "float32"
    compute: str = "float32"
    output: str = "float32"
    reduce: str = "float32"
    note: str = ""  # why ``reduce`` is not what the config asked for, if it is not

    def describe(self) -> str:
        text = (
            f"precision: parameters {self.params}, compute {self.compute}, logits and loss {self.output}, "
            f"gradient reductions {self.reduce}"
        )
        return f"{text} ({self.note})" if self.note else text


# XLA:CPU's AllReducePromotion rewrites every bfloat16 all-reduce and reduce-scatter as a float32 one.
CPU_PROMOTED = "model.reduce_dtype=bfloat16 carries float32 on XLA:CPU, which promotes bf16 reductions"


def reduction_dtype(requested: str | None, param_dtype: str, platform: str | None) -> tuple[str, str]:
    """(the dtype the step's gradient reductions carry on ``platform``, why it differs from ``requested``)."""
    dtype = requested or param_dtype
    if dtype == "bfloat16" and platform == "cpu":
        return "float32", CPU_PROMOTED
    return dtype, ""


def precision_of(cfg: Config, platform: str | None = None) -> Precision:
    """The config's precision policy (``Precision``) on ``platform`` (where the step compiles)."""
    m = cfg.model
    reduce, note = reduction_dtype(m.reduce_dtype, m.param_dtype, platform)
    return Precision(m.param_dtype, m.compute_dtype, "float32", reduce, note)


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """Every decision about how one training step runs on ``mesh``.

    shard: constrains activations by logical names (the preset's rules on the mesh).
    batch_sharding: the [batch, seq_len] token arrays' sharding.
    attention: the attention function and the stored token order.
    experts: the MoE dispatch over the mesh, or None for a dense model.
    pipeline: the compiled schedule, branching and layer layout, or None without ``pipe``.
    compression: ``none``, ``bf16`` or ``int8`` (the data-parallel gradient reduction).
    outer: DiLoCo or local SGD (``ReplicaPlan``), or None for synchronous training.
    reduce_per_use: the weight gradients are reduced over the token axes by the step itself, one
      reduce-scatter or all-reduce per weight use (``shardlib.parallel.reduction``); False in a
      pipeline (its executor reduces) and inside DiLoCo's replicas (run under vmap).
    precision: the dtypes of the parameters, compute, output (logits and loss) and the gradient
      reductions the step makes itself (``Precision``).
    """

    mesh: jax.sharding.Mesh
    preset: str
    rules: Rules
    shard: ActivationSharding
    batch_sharding: NamedSharding
    features: compat.RunFeatures
    attention: AttentionPlan
    experts: ExpertDispatch | None
    pipeline: PipelinePlan | None
    compression: str
    grad_accum: int
    remat: str
    n_layers: int
    outer: ReplicaPlan | None = None
    reduce_per_use: bool = True
    precision: Precision = dataclasses.field(default_factory=lambda: Precision())

    def model_kwargs(self, shard: ActivationSharding | None = None) -> dict:
        """Keyword arguments of ``Transformer.forward``: shard, attention, experts (``shard`` overrides the plan's)."""
        kwargs: dict = {"shard": shard or self.shard, "attention": self.attention.fn}
        if self.experts is not None:
            kwargs["experts"] = self.experts
        return kwargs

    @property
    def token_axes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the mesh axes a batch's rows are split over, those its positions are split over), size-1 axes left out."""
        shape = self.mesh.shape
        return tuple(tuple(a for a in rule_axes(self.rules, name) if shape[a] > 1) for name in ("batch", "length"))  # type: ignore[return-value]

    @property
    def layer_order(self) -> np.ndarray:
        """[n_layers] logical layer of each stored layer: the pipeline's layout, else the identity."""
        if self.pipeline is None:
            return np.arange(self.n_layers)
        return self.pipeline.layer_order

    def sequential_params(self, params: PyTree) -> PyTree:
        """``params`` with the stacked layers in logical order: what a model run in sequence needs."""
        if self.pipeline is None:
            return params
        return {**params, "layers": logical_layers(params["layers"], self.pipeline.layer_order)}

    def active_features(self) -> tuple[str, ...]:
        return compat.active(self.features)

    def describe(self) -> str:
        """The plan in a few lines, for ``describe`` and the report."""
        sizes = " x ".join(f"{a}={n}" for a, n in self.mesh.shape.items() if n > 1) or "one device"
        lines = [f"parallel plan: {sizes}, preset {self.preset}"]
        lines.append(f"  batch {self.batch_sharding.spec}, grad_accum {self.grad_accum}, remat {self.remat}")
        order = "natural order" if self.attention.order is None else "zig-zag token order"
        detail = f"{self.attention.detail}; " if self.attention.detail else ""
        lines.append(f"  attention {self.features.attention} ({detail}{order})")
        if self.experts is not None:
            lines.append("  " + describe_dispatch(self.experts, self.features.experts, self.features.expert))
        if self.pipeline is not None:
            s = self.pipeline.schedule
            patterns = self.pipeline.send_patterns
            down, up = patterns.sends()
            lines.append(
                f"  pipeline {s.name}: p={s.stages} m={s.microbatches} v={s.virtual}, {s.ticks} ticks, bubble "
                f"{float(s.bubble_fraction()):.3f}, branching {self.pipeline.branching}; sends {down} microbatches "
                f"down + {up} up per step (all stages; activations and gradients), over "
                f"{len(patterns.down) - 1} + {len(patterns.up) - 1} permute patterns"
            )
        lines.append(f"  gradient compression {self.compression}")
        lines.append(f"  {self.precision.describe()}")
        rows, positions = self.token_axes
        if self.reduce_per_use and (rows or positions) and self.compression == "none":
            lines.append(
                f"  weight gradients reduced per use over {', '.join(rows + positions)}: a reduce-scatter over the "
                "axes a weight is sharded over, one all-reduce over the rest"
            )
        if self.outer is not None:
            o = self.outer
            inside = [a for a in rule_axes(o.plan.rules, "batch") if self.mesh.shape[a] > 1]
            lines.append(
                f"  {o.settings.describe()}; {o.replicas} replica groups (batch inside each over "
                f"{', '.join(inside) or 'no axis'}), pseudo-gradient compression {o.settings.compression}; "
                "each device also keeps the period's start and the outer momentum"
            )
        lines.append(f"  features: {', '.join(self.active_features())}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    """DiLoCo or local SGD: the outer loop and what runs inside one replica group.

    settings: the algorithm, period and outer optimizer.
    replicas: R, the product of the replica axes' sizes.
    batch_axes: the mesh axes the batch's rows are split over, in order, replica axes among them.
    plan: the plan of one replica, run under vmap over the replica axes: the preset's rules
      (and the attention built on them) with the replica axes taken out. What FSDP means
      there follows: the preset's FSDP axes that are not replica axes.
    """

    settings: OuterSettings
    replicas: int
    batch_axes: tuple[str, ...]
    plan: ParallelPlan


def outer_settings(cfg: Config) -> OuterSettings | None:
    """The DiLoCo strategy's typed settings from the config's ``outer`` section (None: ``none``)."""
    o = cfg.outer
    if o.algorithm == "none":
        return None
    return OuterSettings(
        o.algorithm,
        o.inner_steps,
        o.learning_rate,
        o.momentum,
        o.nesterov,
        tuple(o.replica_axes),
        o.compression,
        o.fragments,
        o.overlap_steps,
        o.mixing,
        o.average_moments,
    )


def _replica_plan(cfg: Config, plan: ParallelPlan) -> ReplicaPlan | None:
    settings = outer_settings(cfg)
    if settings is None:
        return None
    axes = settings.replica_axes
    rules = without_axes(plan.rules, axes)
    shard = ActivationSharding(rules, plan.mesh)
    attention = attention_of(cfg, shard)
    spec = plan.batch_sharding.spec
    split = axes_tuple(spec[0]) if len(spec) else ()
    batch_axes = tuple(a for a in axes if a not in split) + split  # size-1 replica axes are not in the spec
    # The replica axes are batch axes, so batch_sharding's check that microbatches divide covers them.
    inner = dataclasses.replace(plan, rules=rules, shard=shard, attention=attention, reduce_per_use=False)
    return ReplicaPlan(settings, replica_count(plan.mesh, axes), batch_axes, inner)


def run_features(cfg: Config, mesh: jax.sharding.Mesh) -> compat.RunFeatures:
    """The table's view of a run: which features ``cfg`` on ``mesh`` holds."""
    return features_on(cfg, mesh.shape, processes=len({d.process_index for d in mesh.devices.flat}))


def features_on(cfg: Config, shape: Mapping[str, int], processes: int = 1) -> compat.RunFeatures:
    """``run_features`` from axis sizes alone (the planner's meshes have no devices)."""
    return compat.RunFeatures(
        preset=cfg.sharding,
        data_replica=shape["data_replica"],
        pipe=shape["pipe"],
        schedule=cfg.pipeline.schedule,
        virtual_stages=cfg.pipeline.virtual_stages,
        seq=shape["seq"],
        attention=cfg.attention.impl,
        expert=shape["expert"],
        experts=cfg.model.moe.n_experts,
        moe_dispatch=cfg.model.moe.dispatch,
        compression=cfg.grad_compression,
        grad_accum=cfg.grad_accum,
        remat=cfg.model.remat,
        compute_dtype=cfg.model.compute_dtype,
        processes=processes,
        outer=cfg.outer.algorithm,
        replica_axes=tuple(cfg.outer.replica_axes),
    )


def feature_setting(name: str, cfg: Config, shape: Mapping[str, int]) -> str:
    """A feature in the user's terms: the setting that turned it on (``shape``: the mesh's axis sizes)."""
    return {
        "dp": f"sharding={cfg.sharding}",
        "fsdp": f"sharding={cfg.sharding}",
        "tp": f"sharding={cfg.sharding}",
        "fsdp_tp": f"sharding={cfg.sharding}",
        "hsdp": f"data_replica={shape['data_replica']}",
        "pipeline": f"pipe={shape['pipe']} ({cfg.pipeline.schedule})",
        "interleaved": f"pipe={shape['pipe']} with pipeline.virtual_stages={cfg.pipeline.virtual_stages}",
        "zero-bubble": f"pipe={shape['pipe']} (zb-h1)",
        "zero-bubble-v": f"pipe={shape['pipe']} (zb-v)",
        "seq": f"seq={shape['seq']}",
        "ring": f"attention.impl=ring (seq={shape['seq']})",
        "allgather": f"attention.impl=allgather (seq={shape['seq']})",
        "ulysses": f"attention.impl=ulysses (seq={shape['seq']}, ulysses_degree={cfg.attention.ulysses_degree or 'seq'})",
        "fused": "attention.impl=fused",
        "moe": f"model.moe.n_experts={cfg.model.moe.n_experts}",
        "dropless": "model.moe.dispatch=dropless",
        "compression": f"grad_compression={cfg.grad_compression}",
        "accumulation": f"grad_accum={cfg.grad_accum}",
        "remat": f"model.remat={cfg.model.remat}",
        "bf16": "model.compute_dtype=bfloat16",
        "multiprocess": "several processes",
        "diloco": f"outer.algorithm={cfg.outer.algorithm} (outer.replica_axes={list(cfg.outer.replica_axes)})",
    }[name]


def batch_sharding(cfg: Config, shard: ActivationSharding) -> NamedSharding:
    """Sharding of the [batch, seq_len] token arrays; checks that microbatches divide too
    (``grad_accum``'s, or the pipeline's with ``pipe > 1``)."""
    pipelined = shard.mesh.shape["pipe"] > 1
    split, key = (cfg.pipeline.microbatches, "pipeline.microbatches") if pipelined else (cfg.grad_accum, "grad_accum")
    if cfg.batch_size % split:
        raise ValueError(f"batch_size={cfg.batch_size} does not divide into {key}={split}")
    micro = cfg.batch_size // split
    try:
        shard.spec((micro, cfg.seq_len), ("batch", "length"))
        spec = shard.spec((cfg.batch_size, cfg.seq_len), ("batch", "length"))
    except ShardingError as err:
        raise ValueError(
            f"batch_size={cfg.batch_size} with {key}={split} ({micro} sequences per "
            f"microbatch) and seq_len={cfg.seq_len} do not divide over the mesh: {err}"
        ) from err
    return NamedSharding(shard.mesh, spec)


def pipeline_settings(cfg: Config) -> PipelineSettings:
    """The pipeline strategy's typed settings from the config's ``pipeline`` section."""
    p = cfg.pipeline
    return PipelineSettings(p.schedule, p.microbatches, p.virtual_stages, p.branching, p.recompute)


def _pipeline(cfg: Config, mesh: jax.sharding.Mesh, rules: Rules) -> PipelinePlan | None:
    if mesh.shape["pipe"] == 1:
        return None
    batch, length = rule_axes(rules, "batch"), rule_axes(rules, "length")
    automatic = [axis for axis, size in mesh.shape.items() if axis not in {"pipe", *batch, *length} and size > 1]
    # Inside the stages: the partitioner's collectives (automatic axes), attention's over the sequence
    # axis, and an MoE model's all-to-alls and router statistics over every token axis.
    split = [a for a in (*batch, *length) if mesh.shape[a] > 1] if cfg.model.moe.n_experts else ()
    sequence = [a for a in length if mesh.shape[a] > 1]
    return plan_pipeline(
        pipeline_settings(cfg),
        mesh.shape["pipe"],
        cfg.model.n_layers,
        cfg.batch_size,
        collectives_inside_stages=bool(automatic or sequence or split),
        platform=mesh.devices.flat[0].platform,
        moe_period=cfg.model.moe.period if cfg.model.moe.n_experts else 0,
    )


def attention_of(cfg: Config, shard: ActivationSharding) -> AttentionPlan:
    """The run's attention (``cfg.attention``) on ``shard``'s mesh and rules; Ulysses' heads checked now,
    not when the step first traces."""
    a = cfg.attention
    attention = make_attention(
        a.impl, a.load_balance, shard, cfg.seq_len, a.block_k, ulysses_degree=a.ulysses_degree,
        ulysses_kernel=a.ulysses_kernel,
    )  # fmt: skip
    if a.impl == "ulysses":
        split = math.prod(shard.mesh.shape[axis] for axis in rule_axes(shard.rules, "heads"))
        heads = cfg.model.n_heads // split if cfg.model.n_heads % split == 0 else cfg.model.n_heads
        seq = math.prod(shard.mesh.shape[axis] for axis in rule_axes(shard.rules, "length"))
        kv_repeats(heads, cfg.model.n_kv_heads, a.ulysses_degree or seq)
    return attention


def build_plan(cfg: Config, mesh: jax.sharding.Mesh) -> ParallelPlan:
    """The plan for ``cfg`` on ``mesh``; refuses, with the table's one-line reason, what does not compose."""
    features = run_features(cfg, mesh)
    compat.check(features, lambda name: feature_setting(name, cfg, mesh.shape))
    check_mesh_fits_intent(cfg.sharding, mesh.shape)
    rules = preset_rules(cfg.sharding)
    shard = ActivationSharding(rules, mesh)
    attention = attention_of(cfg, shard)
    experts = None
    if cfg.model.moe.n_experts:
        check_experts_divide(cfg.model.moe.n_experts, mesh)
        moe = cfg.model.moe
        experts = (
            dropless_dispatch(shard, moe.dropless_transport) if moe.dispatch == "dropless" else expert_dispatch(shard)
        )
    plan = ParallelPlan(
        mesh=mesh,
        preset=cfg.sharding,
        rules=rules,
        shard=shard,
        batch_sharding=batch_sharding(cfg, shard),
        features=features,
        attention=attention,
        experts=experts,
        pipeline=(pipeline := _pipeline(cfg, mesh, rules)),
        compression=cfg.grad_compression,
        grad_accum=cfg.grad_accum,
        remat=cfg.model.remat,
        n_layers=cfg.model.n_layers,
        reduce_per_use=pipeline is None,
        precision=precision_of(cfg, mesh.devices.flat[0].platform),
    )
    return dataclasses.replace(plan, outer=_replica_plan(cfg, plan))
