"""One plan for how a step runs on a mesh, built once from (config, mesh).

``build_plan`` reads the config and the mesh, checks the features against the
compatibility table (``shardlib.parallel.compat``), and resolves every decision the
strategies need: the rule table and batch sharding, the attention function
and token order, the expert dispatch, the pipeline's compiled schedule and
branching, gradient compression, accumulation and remat. The train step, the
eval step, ``describe``, the report and the planner take this plan; nothing
else re-derives those decisions, so what runs, what is evaluated, what is
printed and what is predicted cannot drift apart.

The strategies themselves (``shardlib.parallel.attention``, ``experts``, ``pipeline``,
``compression``) take arrays, functions and small typed settings, and never
see the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from models.moe import ExpertDispatch
from shardlib.core.rules import Rules, ShardingError, preset_rules, rule_axes
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel import compat
from shardlib.parallel.attention import AttentionPlan, make_attention
from shardlib.parallel.experts import check_experts_divide, expert_dispatch
from shardlib.parallel.pipeline.stages import PipelinePlan, PipelineSettings, logical_layers, plan_pipeline
from shardlib.training.config import Config

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """Every decision about how one training step runs on ``mesh``.

    shard: constrains activations by logical names (the preset's rules on the mesh).
    batch_sharding: the [batch, seq_len] token arrays' sharding.
    attention: the attention function and the stored token order.
    experts: the MoE dispatch over the mesh, or None for a dense model.
    pipeline: the compiled schedule, branching and layer layout, or None without ``pipe``.
    compression: ``none``, ``bf16`` or ``int8`` (the data-parallel gradient reduction).
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

    def model_kwargs(self, shard: ActivationSharding | None = None) -> dict:
        """Keyword arguments of ``Transformer.forward``: shard, attention, experts (``shard`` overrides the plan's)."""
        kwargs: dict = {"shard": shard or self.shard, "attention": self.attention.fn}
        if self.experts is not None:
            kwargs["experts"] = self.experts
        return kwargs

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
        lines.append(f"  attention {self.features.attention} ({order})")
        if self.experts is not None:
            lines.append(f"  experts: {self.features.experts} over expert={self.features.expert} (all-to-all dispatch)")
        if self.pipeline is not None:
            s = self.pipeline.schedule
            forward, backward = self.pipeline.permutes_per_step()
            lines.append(
                f"  pipeline {s.name}: p={s.stages} m={s.microbatches} v={s.virtual}, {s.ticks} ticks, bubble "
                f"{float(s.bubble_fraction()):.3f}, branching {self.pipeline.branching}, sends {forward} forward + "
                f"{backward} backward per step"
            )
        lines.append(f"  gradient compression {self.compression}")
        lines.append(f"  features: {', '.join(self.active_features())}")
        return "\n".join(lines)


def run_features(cfg: Config, mesh: jax.sharding.Mesh) -> compat.RunFeatures:
    """The table's view of a run: which features ``cfg`` on ``mesh`` holds."""
    shape = mesh.shape
    return compat.RunFeatures(
        preset=cfg.sharding,
        pipe=shape["pipe"],
        schedule=cfg.pipeline.schedule,
        virtual_stages=cfg.pipeline.virtual_stages,
        seq=shape["seq"],
        attention=cfg.attention.impl,
        expert=shape["expert"],
        experts=cfg.model.moe.n_experts,
        compression=cfg.grad_compression,
        grad_accum=cfg.grad_accum,
        remat=cfg.model.remat,
        compute_dtype=cfg.model.compute_dtype,
        processes=len({d.process_index for d in mesh.devices.flat}),
    )


def _setting(name: str, cfg: Config, mesh: jax.sharding.Mesh) -> str:
    """A feature in the user's terms: the setting that turned it on."""
    shape = mesh.shape
    return {
        "dp": "sharding=dp",
        "fsdp": "sharding=fsdp",
        "tp": "sharding=tp",
        "fsdp_tp": "sharding=fsdp_tp",
        "pipeline": f"pipe={shape['pipe']} ({cfg.pipeline.schedule})",
        "interleaved": f"pipe={shape['pipe']} with pipeline.virtual_stages={cfg.pipeline.virtual_stages}",
        "seq": f"seq={shape['seq']}",
        "ring": f"attention.impl=ring (seq={shape['seq']})",
        "allgather": f"attention.impl=allgather (seq={shape['seq']})",
        "fused": "attention.impl=fused",
        "moe": f"model.moe.n_experts={cfg.model.moe.n_experts}",
        "compression": f"grad_compression={cfg.grad_compression}",
        "accumulation": f"grad_accum={cfg.grad_accum}",
        "remat": f"model.remat={cfg.model.remat}",
        "bf16": "model.compute_dtype=bfloat16",
        "multiprocess": "several processes",
    }[name]


def batch_sharding(cfg: Config, shard: ActivationSharding) -> NamedSharding:
    """Sharding of the [batch, seq_len] token arrays; checks that microbatches divide too."""
    micro = cfg.batch_size // cfg.grad_accum
    try:
        shard.spec((micro, cfg.seq_len), ("batch", "length"))
        spec = shard.spec((cfg.batch_size, cfg.seq_len), ("batch", "length"))
    except ShardingError as err:
        raise ValueError(
            f"batch_size={cfg.batch_size} with grad_accum={cfg.grad_accum} ({micro} sequences per "
            f"microbatch) and seq_len={cfg.seq_len} do not divide over the mesh: {err}"
        ) from err
    return NamedSharding(shard.mesh, spec)


def pipeline_settings(cfg: Config) -> PipelineSettings:
    """The pipeline strategy's typed settings from the config's ``pipeline`` section."""
    p = cfg.pipeline
    return PipelineSettings(p.schedule, p.microbatches, p.virtual_stages, p.branching)


def _pipeline(cfg: Config, mesh: jax.sharding.Mesh, rules: Rules) -> PipelinePlan | None:
    if mesh.shape["pipe"] == 1:
        return None
    manual = {"pipe", *rule_axes(rules, "batch")}
    automatic = [axis for axis, size in mesh.shape.items() if axis not in manual and size > 1]
    return plan_pipeline(
        pipeline_settings(cfg),
        mesh.shape["pipe"],
        cfg.model.n_layers,
        cfg.batch_size,
        collectives_inside_stages=bool(automatic),
        platform=mesh.devices.flat[0].platform,
    )


def build_plan(cfg: Config, mesh: jax.sharding.Mesh) -> ParallelPlan:
    """The plan for ``cfg`` on ``mesh``; refuses, with the table's one-line reason, what does not compose."""
    features = run_features(cfg, mesh)
    compat.check(features, lambda name: _setting(name, cfg, mesh))
    rules = preset_rules(cfg.sharding)
    shard = ActivationSharding(rules, mesh)
    attention = make_attention(
        cfg.attention.impl, cfg.attention.load_balance, shard, cfg.seq_len, cfg.attention.block_k
    )
    experts = None
    if cfg.model.moe.n_experts:
        check_experts_divide(cfg.model.moe.n_experts, mesh)
        experts = expert_dispatch(shard)
    return ParallelPlan(
        mesh=mesh,
        preset=cfg.sharding,
        rules=rules,
        shard=shard,
        batch_sharding=batch_sharding(cfg, shard),
        features=features,
        attention=attention,
        experts=experts,
        pipeline=_pipeline(cfg, mesh, rules),
        compression=cfg.grad_compression,
        grad_accum=cfg.grad_accum,
        remat=cfg.model.remat,
        n_layers=cfg.model.n_layers,
    )
