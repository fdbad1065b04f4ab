"""DiLoCo for a plan whose data-parallel axis crosses hosts: when to propose it, its H, and how to say so.

When a fitting plan's ``data`` axis (or, under HSDP, ``data_replica``) crosses hosts, the
planner proposes DiLoCo over it (``propose_diloco``) with the H whose outer all-reduce takes at most
``HIDDEN`` of the H inner steps it follows, when that beats the plan's step; ``format_diloco`` is
the paragraph ``planner_output.format_plans`` prints for it.
"""

from __future__ import annotations

import dataclasses
import math

from shardlib.analysis.planner import MeshPlan
from shardlib.analysis.planner_output import _gib, _ms
from shardlib.core.rules import PRESETS
from shardlib.training.config import Config

HIDDEN = 0.05  # DiLoCo: the outer all-reduce's share of the H inner steps it follows, at most


@dataclasses.dataclass(frozen=True)
class DiLoCoProposal:
    """DiLoCo over data for ``plan``: H, one inner step (no data traffic), one outer all-reduce (bytes per device)."""

    plan: MeshPlan
    every: int
    inner_s: float
    outer_s: float
    outer_bytes: float
    link: str
    axis: str = "data"  # the replica axis: data, or data_replica under HSDP

    @property
    def step_s(self) -> float:
        """Synchronous DiLoCo's average step: the inner step plus 1/H of the outer all-reduce."""
        return self.inner_s + self.outer_s / self.every

    def overlap_fragments(self, n_layers: int) -> int | None:
        """The fewest streaming fragments F (dividing the layers) whose all-reduce, P/F, takes no longer than
        one inner step, so that ``outer.overlap_steps: 1`` hides it whole; None if no F does."""
        needed = max(1, math.ceil(self.outer_s / self.inner_s)) if self.inner_s > 0 else None
        fits = [f for f in range(1, n_layers + 1) if n_layers % f == 0 and needed is not None and f >= needed]
        return fits[0] if fits else None


def propose_diloco(plans: list[MeshPlan], cfg: Config, profile, *, mfu: float | None = None) -> DiLoCoProposal | None:
    """DiLoCo for the fastest plan whose data-parallel axis crosses hosts, or None: a config already
    running one, or no gain (the plan hides its sync).

    The replica axis is ``data_replica`` under HSDP (FSDP stays inside each replica, over ``data``),
    else ``data`` for a plan without FSDP over it (the replicas would take FSDP's axis).
    """
    from shardlib.analysis.report.analytic import predict_terms
    from shardlib.analysis.report.compute import hardware_flops
    from shardlib.analysis.report.hardware import axes_across_hosts, estimate_time
    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.training.config_schema import OuterConfig

    if cfg.outer.algorithm != "none":
        return None
    for p in plans:
        slow = axes_across_hosts(p.sizes, profile.devices_per_host)
        axis = "data_replica" if p.sizes["data_replica"] > 1 else "data"
        if p.dropped or axis not in slow or (axis == "data" and PRESETS[p.sharding].fsdp) or p.sizes["pipe"] > 1:
            continue  # (DiLoCo does not run with a pipeline: the compatibility table refuses it)
        outer = OuterConfig(algorithm="diloco", inner_steps=1, replica_axes=[axis])
        diloco = p.cfg.model_copy(update={"outer": outer})
        layout = resolve_layout(diloco, p.sizes, p.sharding)
        terms = predict_terms(layout)
        outer = [t for t in terms if t.strategy == "diloco"]
        dtype, layers, flops = cfg.model.compute_dtype, cfg.model.n_layers, hardware_flops(layout)
        inner = [t for t in terms if t.strategy != "diloco"]
        inner_s = estimate_time(inner, p.sizes, flops, dtype, profile, n_layers=layers, mfu=mfu).step_s
        outer_s = estimate_time(outer, p.sizes, 0.0, dtype, profile, n_layers=1, mfu=mfu).step_s
        every = max(1, math.ceil(outer_s / (HIDDEN * inner_s))) if inner_s > 0 else 1
        wire = sum(t.wire_bytes for t in outer)
        proposal = DiLoCoProposal(p, every, inner_s, outer_s, wire, profile.links.across_hosts.name, axis)
        return proposal if proposal.step_s < p.step_s else None
    return None


def format_diloco(proposal: DiLoCoProposal) -> str:
    """What the slow link costs the plan now, DiLoCo's H and average step, and the fragments that would
    let the all-reduce hide behind the inner steps' compute."""
    h, axis = proposal.every, proposal.axis
    replicas = "" if axis == "data" else f" outer.replica_axes=[{axis}]"
    return _format_synchronous(proposal, h, axis, replicas) + _format_overlap(proposal, h)


def _format_overlap(proposal: DiLoCoProposal, h: int) -> str:
    fragments = proposal.overlap_fragments(proposal.plan.cfg.model.n_layers)
    if fragments is None:
        return " No streaming fragments make one all-reduce as short as an inner step on this model."
    every = -(-h // fragments) * fragments  # H a multiple of F
    flags = "outer.overlap_steps=1" + (f" outer.fragments={fragments}" if fragments > 1 else "")
    if every != h:
        flags += f" outer.inner_steps={every}"
    return (
        f" With {flags}, each all-reduce ({_ms(proposal.outer_s / fragments)}) runs beside one inner step "
        f"instead of before it: the average step is the inner step's, {_ms(proposal.inner_s)}, if the "
        "collectives overlap compute (GPUs; XLA:CPU runs them in turn)."
    )


def _format_synchronous(proposal: DiLoCoProposal, h: int, axis: str, replicas: str) -> str:
    p = proposal.plan
    return (
        f"DiLoCo: {p.label} ({_ms(p.step_s)} per step) sends its gradients over {axis}, which crosses hosts "
        f"({proposal.link}: {_ms(p.time.comm_s_per_axis.get(axis, 0.0))} per step). With outer.algorithm=diloco "
        f"outer.inner_steps={h}{replicas}, an inner step takes {_ms(proposal.inner_s)} with no traffic there, and the outer "
        f"all-reduce ({_gib(proposal.outer_bytes)}, {_ms(proposal.outer_s)}) hides behind the {h} inner steps it "
        f"follows (at most {HIDDEN:.0%} of their {_ms(h * proposal.inner_s)}); synchronous DiLoCo, as shardlib runs "
        f"it, averages {_ms(proposal.step_s)} per step ({p.step_s / proposal.step_s:.2f}x). A larger H syncs less "
        "often at some cost in loss (the DiLoCo paper trains 8 replicas at H = 500)."
    )
