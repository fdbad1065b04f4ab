"""``python -m shardlib.analysis.planner``: which mesh and preset to train a config on N devices with.

    python -m shardlib.analysis.planner --config configs/1b.yaml --devices 64 --hardware h100
    python -m shardlib.analysis.planner --config configs/tiny.yaml --devices 8 --hardware h100 --verify 2

Every way to write N = data x pipe x seq x model (x expert) is tried with every preset that
uses all of its axes (``tp``/``fsdp_tp`` need model > 1, ``dp``/``tp`` leave
nothing to shard over data with FSDP, and so on). The HSDP presets (``hsdp``,
``hsdp_tp``) split each candidate's ``data`` where it crosses hosts
(``hierarchical_mesh``): FSDP inside a host, ``data_replica`` across. Plans whose dimensions do
not divide are dropped with the rule's own error; the rest get a per-device
memory and step-time prediction from the analytic model (``shardlib.analysis.report``)
on the hardware profile; plans whose training or eval step does not fit in memory
(``MemoryEstimate.peak``) are dropped; the rest
are ranked by step time, then memory.

``pipe`` is enumerated with the schedules of ``plan_candidates.PIPELINE_SCHEDULES`` (GPipe, 1F1B,
ZB-V, ZB-H1, interleaved 1F1B at every chunk count up to the layers per stage), each at the most
microbatches the batch allows (GPipe also at fewer, as its memory grows with them):
activation memory comes from the schedule's table, and the compute time from the table run
in lockstep as the SPMD executor runs it (its bubble, at the executor's cost per action,
recomputed forwards included). Combinations the compatibility table refuses (interleaved
stages with MoE, a pipeline with compressed gradients) are dropped with its reason; pipelines
beside ``seq`` and ``expert`` are planned like any other. ``expert`` is enumerated for MoE configs only
(without MoE layers it would only repeat ``data``).

When a fitting plan's ``data`` axis (or, under HSDP, ``data_replica``) crosses hosts, the
planner proposes DiLoCo over it (``propose_diloco``) with the H whose outer all-reduce takes at most
``HIDDEN`` of the H inner steps it follows, when that beats the plan's step.

Without a pipeline a mesh takes the fewest microbatches (``grad_accum`` dividing the batch) that
fit. ``--json`` prints every candidate with its terms (each collective's seconds, link, overlap
class and exposed share), memory, TFLOP/s and MFU; ``--mesh FILE`` evaluates the config on that
one mesh (its ``across_hosts`` deciding the links) instead of searching. Text output fits 100
columns: a table of the top plans, the winner explained on its own lines, every dropped kind
with its reason (out-of-memory plans with the step they would take).

``--verify K`` compiles the top K plans on N emulated CPU devices and prints
predicted against compiled communication (per axis, with the avoidable
traffic of XLA:CPU taken out) and memory; each must agree within 10%, else
the command exits with status 1 and names the predictions that missed. When no candidate fits,
it lists why each kind was dropped and exits with status 1 (``EXIT_NO_PLAN``); usage errors are 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

from shardlib.analysis.plan_candidates import (
    PLAN_AXES,
    candidate_meshes,
    config_variants,
    hierarchical_mesh,
    planned_axes,
    redundant,
    variant_label,
)
from shardlib.core.rules import PRESETS, ShardingError
from shardlib.training.config import Config, load_config

TOLERANCE = 0.10
EXIT_MISSED = 1  # --verify: a prediction missed its bound (usage errors are 2)
EXIT_NO_PLAN = 1  # no candidate fits: the answer is no (as grep's 1 for no match), the reasons printed
HIDDEN = 0.05  # DiLoCo: the outer all-reduce's share of the H inner steps it follows, at most


@dataclasses.dataclass
class MeshPlan:
    sizes: dict[str, int]
    sharding: str
    cfg: Config  # what this plan runs: the user's config at another grad_accum, or a pipelined variant of it
    layout: object = None  # shardlib.analysis.report.layout.Layout
    memory: object = None  # MemoryEstimate
    time: object = None  # TimeEstimate
    bubble: float = 0.0  # a pipeline's idle share of the step (compute.pipeline_bubble)
    dropped: str = ""

    @property
    def label(self) -> str:
        shown = " x ".join(f"{a}={n}" for a, n in self.sizes.items() if n > 1) or "1 device"
        return f"{shown} {self.sharding}{variant_label(self.cfg, self.sizes)}"

    @property
    def step_s(self) -> float:
        return self.time.step_s if self.time else math.inf


def make_plans(
    cfg: Config,
    devices: int,
    profile,
    *,
    presets: Sequence[str] = tuple(PRESETS),
    axes: Sequence[str] = PLAN_AXES,
    mfu: float | None = None,
) -> list[MeshPlan]:
    """All plans for ``cfg`` on ``devices``: ranked fitting ones first, then the dropped ones."""
    plans = []
    for flat in candidate_meshes(devices, planned_axes(cfg, axes)):
        for sharding in presets:
            # An HSDP preset keeps data's FSDP inside a host and replicates across hosts.
            sizes = hierarchical_mesh(flat, profile.devices_per_host) if PRESETS[sharding].hierarchical else flat
            variants = [
                MeshPlan(sizes, sharding, v.model_copy(update={"sharding": sharding}))
                for v in config_variants(cfg, sizes)
            ]
            if sizes["pipe"] > 1:
                for plan in variants:
                    evaluate_plan(plan, profile, mfu)
                plans += variants
            else:
                plans.append(_fewest_fitting(variants, cfg.grad_accum, profile, mfu))
    return rank(plans)


def rank(plans: list[MeshPlan]) -> list[MeshPlan]:
    """Fitting plans by step time, then memory; the dropped ones after them."""
    fitting = sorted((p for p in plans if not p.dropped), key=lambda p: (p.step_s, p.memory.peak))
    return fitting + [p for p in plans if p.dropped]


def _fewest_fitting(variants: list[MeshPlan], own: int, profile, mfu: float | None) -> MeshPlan:
    """The first fitting of a mesh's accumulation variants (fewest microbatches first: in the model
    more of them only add FSDP gathers and never save time), else the user's ``grad_accum``, dropped."""
    for plan in variants:
        evaluate_plan(plan, profile, mfu)
        if not plan.dropped:
            return plan
    return next((p for p in variants if p.cfg.grad_accum == own), variants[0])


def evaluate_plan(plan: MeshPlan, profile, mfu: float | None = None, across: dict[str, int] | None = None) -> None:
    """Fills in the plan's layout, memory, bubble and time, or says why it was dropped (a plan dropped
    for memory keeps its time). ``across``: a mesh file's ``across_hosts``, else hosts fill from ``model``."""
    from shardlib.analysis.report.analytic import predict_terms
    from shardlib.analysis.report.compute import hardware_flops, pipeline_bubble
    from shardlib.analysis.report.hardware import estimate_time
    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.analysis.report.memory import estimate_memory
    from shardlib.parallel.compat import IncompatibleFeatures, check
    from shardlib.training.parallel_plan import feature_setting, features_on

    cfg, sizes = plan.cfg, plan.sizes
    if reason := redundant(sizes, plan.sharding):
        plan.dropped = reason
        return
    try:
        check(features_on(cfg, sizes), lambda name: feature_setting(name, cfg, sizes))
        plan.layout = resolve_layout(cfg, sizes, plan.sharding)
    except IncompatibleFeatures as err:
        plan.dropped = f"refused: {err}"
        return
    except (ShardingError, ValueError) as err:
        plan.dropped = f"does not divide: {err}"
        return
    plan.memory = estimate_memory(plan.layout)
    plan.bubble = pipeline_bubble(plan.layout)
    plan.time = estimate_time(
        predict_terms(plan.layout),
        sizes,
        hardware_flops(plan.layout),
        cfg.model.compute_dtype,
        profile,
        n_layers=cfg.model.n_layers,
        mfu=mfu,
        across=across,
        bubble=plan.bubble,
    )
    if plan.memory.peak > profile.usable_bytes:  # the training step's peak, or the eval step's beside the state
        which = " (its eval step)" if plan.memory.eval_total > plan.memory.total else ""
        plan.dropped = f"needs {_gib(plan.memory.peak)}{which} > {_gib(profile.usable_bytes)} usable"


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


def why_best(best: MeshPlan, other: MeshPlan) -> str:
    """One sentence on why ``best`` beats ``other``."""
    a, b = best.time, other.time
    parts = []
    if b.compute_s > a.compute_s * 1.01:
        why = "its devices split less of the work"
        if other.bubble > best.bubble + 0.01:
            why = f"its pipeline idles {other.bubble:.0%} of the step and recomputes each forward"
        parts.append(f"compute {_ms(b.compute_s)} vs {_ms(a.compute_s)} ({why})")
    if b.exposed_s > a.exposed_s:
        worst = max(b.comm_s_per_axis, key=b.comm_s_per_axis.get, default=None)
        where = f", most on {worst} over {b.link_per_axis[worst]}" if worst else ""
        parts.append(f"exposed communication {_ms(b.exposed_s)} vs {_ms(a.exposed_s)}{where}")
    if not parts:
        parts.append("same time")
    if other.memory.peak < best.memory.peak * 0.95:
        parts.append(f"though it would need only {_gib(other.memory.peak)} (vs {_gib(best.memory.peak)})")
    elif other.memory.peak > best.memory.peak * 1.05:
        parts.append(f"and needs {_gib(other.memory.peak)} (vs {_gib(best.memory.peak)})")
    return f"beats {other.label} ({_ms(other.step_s)}): " + "; ".join(parts)


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _gib(n: float) -> str:
    from shardlib.analysis.report.report import fmt_bytes

    return fmt_bytes(n)


WIDTH = 100  # the text output fits a terminal this wide
_SHORT = {"data_replica": "dr", "data": "d", "pipe": "p", "expert": "e", "seq": "s", "model": "m"}


def short_label(plan: MeshPlan) -> str:
    """``dr8 d4 m2 hsdp_tp ga1`` / ``d4 p2 tp 1f1b m16 v2``: the plan in a table cell (legend printed)."""
    mesh = " ".join(f"{_SHORT[a]}{n}" for a, n in plan.sizes.items() if n > 1) or "1"
    if plan.sizes["pipe"] == 1:
        return f"{mesh} {plan.sharding} ga{plan.cfg.grad_accum}"
    p = plan.cfg.pipeline
    chunks = f" v{p.virtual_stages}" if p.virtual_stages > 1 and p.schedule != "zb-v" else ""
    schedule = {"interleaved-1f1b": "i1f1b"}.get(p.schedule, p.schedule)
    return f"{mesh} {plan.sharding} {schedule} m{p.microbatches}{chunks}"


def plan_rates(plan: MeshPlan, profile) -> dict[str, float]:
    """Throughput per device: tokens/s, model TFLOP/s ((6 x params + attention) per token) and MFU
    (those FLOPs over the dense peak; the profile's ``mfu`` is of the FLOPs executed, remat included)."""
    cfg = plan.cfg
    devices = math.prod(plan.sizes.values())
    tokens = cfg.batch_size * cfg.seq_len / plan.step_s / devices
    flops = tokens * cfg.model.flops_per_token(cfg.seq_len)
    return {
        "tokens_per_s_per_device": tokens,
        "tflops_per_device": flops / 1e12,
        "mfu": flops / profile.peak_flops(cfg.model.compute_dtype),
    }


def plan_dict(plan: MeshPlan, profile) -> dict:
    """One candidate for ``--json``: its layout, variant, memory, time with every term, and rates."""
    pipeline = plan.cfg.pipeline if plan.sizes["pipe"] > 1 else None
    out = {
        "label": plan.label,
        "sizes": {a: n for a, n in plan.sizes.items() if n > 1},
        "sharding": plan.sharding,
        "grad_accum": plan.cfg.grad_accum,
        "pipeline": pipeline
        and {
            "schedule": pipeline.schedule,
            "microbatches": pipeline.microbatches,
            "virtual_stages": pipeline.virtual_stages,
            "recompute": pipeline.recompute,
        },
        "dropped": plan.dropped or None,
        "bubble": plan.bubble,
        "memory": plan.memory.as_dict() if plan.memory else None,
        "time": plan.time.as_dict() if plan.time else None,
    }
    return out | (plan_rates(plan, profile) if plan.time else {})


def plans_json(plans: list[MeshPlan], cfg: Config, devices: int, profile) -> dict:
    return {
        "params": cfg.model.num_params(),
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "devices": devices,
        "profile": profile.model_dump(),
        "usable_bytes": profile.usable_bytes,
        "plans": [plan_dict(p, profile) for p in plans],
    }


def _wrap(text: str, indent: str = "  ") -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def format_plans(plans: list[MeshPlan], cfg: Config, devices: int, profile, top: int = 10) -> str:
    """The top plans as a table (lines of at most ``WIDTH``), the winner explained on its own lines,
    then every dropped kind with its reason."""
    from shardlib.analysis.report.views import table

    fitting = [p for p in plans if not p.dropped]
    dropped = [p for p in plans if p.dropped]
    head = (
        f"{cfg.model.num_params():,} params, {cfg.batch_size} x {cfg.seq_len} tokens per step, "
        f"{cfg.model.compute_dtype} | {devices} x {profile.name}: {profile.description}; compute at "
        f"{fitting[0].time.mfu if fitting else profile.mfu:.2f} of peak, {_gib(profile.usable_bytes)} usable per device"
    )
    out = [*_wrap(head, ""), ""]
    rows = []
    for i, p in enumerate(fitting[:top], 1):
        rates = plan_rates(p, profile)
        rows.append(
            [
                i,
                short_label(p),
                _gib(p.memory.peak),
                _ms(p.time.step_s),
                _ms(p.time.exposed_s),
                f"{rates['tflops_per_device']:.0f}",
                f"{rates['mfu']:.0%}",
                f"{rates['tokens_per_s_per_device']:,.0f}",
            ]
        )
    if rows:
        out += table(["#", "plan", "memory", "step", "exposed", "TFLOP/s", "MFU", "tok/s/dev"], rows)
        out += [
            "  (d data, dr data_replica, p pipe, e expert, s seq, m model; ga grad_accum; m microbatches,",
            "   v chunks per stage, i1f1b interleaved 1F1B; TFLOP/s and MFU per device, of the model's FLOPs)",
        ]
        out += ["", *_explain_best(fitting[0])]
        for other in fitting[1:4]:
            out += _wrap(why_best(fitting[0], other))
        seen = {p.label for p in fitting[:4]}
        for other in fitting[4:]:
            if other.sharding != fitting[0].sharding and other.label not in seen:
                out += _wrap(why_best(fitting[0], other))
                seen.add(other.label)
                break
        # The best plan of the other kind (with a pipeline, or without one), if not explained yet.
        piped = fitting[0].sizes["pipe"] > 1
        other = next((p for p in fitting[1:] if (p.sizes["pipe"] > 1) != piped), None)
        if other is not None and other.label not in seen:
            out += _wrap(why_best(fitting[0], other))
    else:
        out.append("no plan fits: every candidate was dropped (reasons below)")
    if len(fitting) > top:
        out.append(f"  ({len(fitting) - top} more fitting plans not shown; --top N or --json for all)")
    if fitting and (proposal := propose_diloco(fitting, cfg, profile, mfu=fitting[0].time.mfu)):
        out += ["", *_wrap(format_diloco(proposal), "")]
    return "\n".join(out + _dropped_lines(dropped))


def _explain_best(best: MeshPlan) -> list[str]:
    """The winner on its own lines: compute, each axis's traffic and link, what is exposed, memory."""
    t = best.time
    out = _wrap(f"best: {best.label}", "")
    bubble = f", of which the pipeline idles {best.bubble:.0%}" if best.bubble else ""
    out += _wrap(
        f"compute {_ms(t.compute_s)}{bubble}; exposed communication {_ms(t.exposed_s)} (hidden {_ms(t.hidden_s)})"
    )
    for axis, seconds in t.comm_s_per_axis.items():
        out.append(f"  {axis:12s} {_ms(seconds):>10s} over {t.link_per_axis[axis]}")
    m = best.memory
    out += _wrap(
        f"memory {_gib(m.peak)}: state {_gib(m.state)}, gradients {_gib(m.grads)}, activations "
        f"{_gib(m.activations)}, working {_gib(m.working)}, eval {_gib(m.eval_total)}"
    )
    return out


def _dropped_lines(dropped: list[MeshPlan]) -> list[str]:
    """Every dropped kind with its reason (one plan per reason), out-of-memory ones with their time."""
    out = []
    refused = [p for p in dropped if p.dropped.startswith("refused")]
    if refused:
        out += ["", f"dropped, refused by the compatibility table ({len(refused)}); one per reason:"]
        reasons = {p.dropped.split(": ", 2)[-1]: p for p in refused}  # the table's reason, not the settings
        for p in reasons.values():
            out += _wrap(f"{p.label}: {p.dropped.removeprefix('refused: ')}")
    memory_drops = sorted((p for p in dropped if p.dropped.startswith("needs")), key=lambda p: p.step_s)
    if memory_drops:
        out += ["", f"dropped, out of memory ({len(memory_drops)}), fastest first (their step if they fit):"]
        for p in memory_drops[:6]:
            out += _wrap(f"{short_label(p)}: {p.dropped} ({_ms(p.step_s)})")
    divide_drops = [p for p in dropped if p.dropped.startswith("does not divide")]
    if divide_drops:
        out += ["", f"dropped, does not divide ({len(divide_drops)}); one per reason:"]
        reasons: dict[str, MeshPlan] = {}
        for p in divide_drops:  # key: what failed (a parameter path, or the batch), not the mesh
            reasons.setdefault(p.dropped.removeprefix("does not divide: ").split(":")[0], p)
        for p in reasons.values():
            out += _wrap(f"{p.label}: {p.dropped.removeprefix('does not divide: ')}")
    redundant_drops = [p for p in dropped if not p.dropped.startswith(("refused", "needs", "does not divide"))]
    if redundant_drops:  # plan_candidates.redundant: the same as another candidate, or an axis left idle
        out += ["", f"dropped, not worth planning ({len(redundant_drops)}); one per reason:"]
        reasons = {}
        for p in redundant_drops:
            reasons.setdefault(p.dropped, p)
        for p in reasons.values():
            out += _wrap(f"{p.label}: {p.dropped}")
    return out


def verify(plans: list[MeshPlan], cfg: Config, k: int) -> tuple[str, list[str]]:
    """Compiles the top ``k`` plans (emulated devices) and compares them with their predictions.

    Returns the printed comparison and the predictions that missed the
    ``TOLERANCE`` bound, one line each naming the plan, the quantity and the
    ratio, so the caller can fail on them (an empty list: all agreed).
    """
    from shardlib.analysis.report.measure import measure
    from shardlib.analysis.report.report import build_report, fmt_bytes
    from shardlib.core.mesh import build_mesh, mesh_spec

    out, misses = [], []
    for p in [p for p in plans if not p.dropped][:k]:
        mesh = build_mesh(dataclasses.replace(mesh_spec(**p.sizes), platform="cpu"))
        measured = measure(p.cfg, mesh)
        report = build_report(p.layout, measured=measured)
        out.append(f"verify {p.label} (compiled in {measured.compile_seconds:.1f} s):")
        for row in report.axes:
            ratio = row.ratio_without_avoidable
            good = ratio is not None and abs(ratio - 1) <= TOLERANCE or (row.predicted == 0 and not row.measured)
            if not good:
                misses.append(f"{p.label}: {row.axis} communication, ratio without avoidable {_r(ratio)}")
            out.append(
                f"  {row.axis:6s} predicted {fmt_bytes(row.predicted):>11s}  compiled {fmt_bytes(row.measured):>11s}"
                f" (avoidable {fmt_bytes(row.avoidable)})  ratio {_r(row.ratio)}, without avoidable {_r(ratio)}"
                f"  {'ok' if good else 'GAP'}"
            )
        mem = report.memory_as_compiled
        peak = measured.memory.peak if measured.memory else None
        if peak:
            ratio = mem.total / peak
            good = abs(ratio - 1) <= TOLERANCE
            if not good:
                misses.append(f"{p.label}: memory, ratio {ratio:.2f}")
            out.append(
                f"  memory predicted {fmt_bytes(mem.total)} compiled {fmt_bytes(peak)} ratio {ratio:.2f}  {'ok' if good else 'GAP'}"
            )
        out += [f"  note: {n}" for n in report.notes]
    return "\n".join(out), misses


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def mesh_plans(cfg: Config, mesh_file: str, devices: int | None, profile, presets, mfu) -> tuple[list[MeshPlan], int]:
    """``--mesh FILE``: the config as it is (its preset, or each of ``presets``) on that one mesh, its
    ``across_hosts`` deciding the links; (the plans, the device count)."""
    from shardlib.analysis.report.__main__ import mesh_sizes
    from shardlib.core.mesh import load_mesh_spec

    spec = load_mesh_spec(mesh_file)
    sizes = mesh_sizes(spec, devices)
    plans = [
        MeshPlan(sizes, preset, cfg.model_copy(update={"sharding": preset})) for preset in presets or [cfg.sharding]
    ]
    for plan in plans:
        evaluate_plan(plan, profile, mfu, dict(spec.across_hosts))
    return rank(plans), math.prod(sizes.values())


def check_plan_arguments(args: argparse.Namespace) -> None:
    """Rejects counts the planner cannot use, before any device starts (each error names its flag)."""
    from shardlib.analysis.report.report import check_mfu

    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices is how many devices to plan for: at least 1, got {args.devices}")
    if args.verify < 0:
        raise ValueError(f"--verify K compiles the top K plans: K must be 0 or more, got {args.verify}")
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    check_mfu(args.mfu)


def _main(args: argparse.Namespace) -> int:
    from shardlib.analysis.report.hardware import load_profile
    from shardlib.core.mesh import mesh_spec, prepare_devices

    check_plan_arguments(args)
    if args.verify:  # emulated CPU devices, if the backends have not started yet (else build_mesh says)
        prepare_devices(dataclasses.replace(mesh_spec(), platform="cpu", emulate_cpu_devices=args.devices))
    cfg = load_config(args.config, args.overrides)
    profile = load_profile(args.hardware)
    presets = args.presets.split(",") if args.presets else list(PRESETS)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    axes = args.axes.split(",") if args.axes else list(PLAN_AXES)
    if set(axes) - set(PLAN_AXES) or not axes:
        raise ValueError(f"--axes takes some of {', '.join(PLAN_AXES)}, got {args.axes!r}")
    if args.mesh:
        plans, devices = mesh_plans(cfg, args.mesh, args.devices, profile, presets if args.presets else None, args.mfu)
    else:
        if args.devices is None:
            raise ValueError("--devices is how many devices to plan for (or give --mesh FILE to evaluate one layout)")
        devices = args.devices
        plans = make_plans(cfg, devices, profile, presets=presets, axes=axes, mfu=args.mfu)
    if args.json:
        import json

        print(json.dumps(plans_json(plans, cfg, devices, profile), indent=1))
    else:
        print(format_plans(plans, cfg, devices, profile, top=args.top))
    if all(p.dropped for p in plans):
        print(
            f"error: no plan fits {devices} x {profile.name}: all {len(plans)} candidates were dropped, "
            "for the reasons above",
            file=sys.stderr,
        )
        return EXIT_NO_PLAN
    if args.verify:
        text, misses = verify(plans, cfg, args.verify)
        print("\n" + text)
        if misses:
            print(
                f"\nerror: {len(misses)} prediction(s) off by more than {TOLERANCE:.0%} (the notes above say why):",
                file=sys.stderr,
            )
            for miss in misses:
                print(f"  {miss}", file=sys.stderr)
            return EXIT_MISSED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from shardlib.training.cli import run_guarded

    parser = argparse.ArgumentParser(prog="python -m shardlib.analysis.planner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--devices", type=int, help="how many devices to plan for (with --mesh: to size a -1 axis)")
    parser.add_argument(
        "--mesh", help="a mesh YAML file: evaluate that one layout (the config's preset) instead of searching"
    )
    parser.add_argument(
        "--json", action="store_true", help="every candidate, its terms, memory, TFLOP/s and MFU as JSON"
    )
    parser.add_argument("--hardware", default="h100", help="hardware profile: h100, h200 or a YAML file (default h100)")
    parser.add_argument("--mfu", type=float, help="utilisation for compute time (default: the profile's)")
    parser.add_argument("--presets", help="comma-separated presets to consider (default: all)")
    parser.add_argument(
        "--axes", help="comma-separated mesh axes to plan over (default: data,pipe,seq,model; expert too for MoE)"
    )
    parser.add_argument("--top", type=int, default=10, help="fitting plans to show (default 10)")
    parser.add_argument(
        "--verify", type=int, default=0, metavar="K", help="compile the top K plans on emulated CPU devices"
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seq_len=4096")
    return run_guarded(_main, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
