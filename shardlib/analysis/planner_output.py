"""The planner's printed and JSON views of its plans (``python -m shardlib.analysis.planner``'s output).

``--json`` prints every candidate with its terms (each collective's seconds, link, overlap
class and exposed share), memory, TFLOP/s and MFU (``plans_json``). Text output (``format_plans``)
fits 100 columns: a table of the top plans, the winner explained on its own lines, every dropped kind
with its reason (out-of-memory plans with the step they would take), and the DiLoCo proposal if any.
"""

from __future__ import annotations

import math

from shardlib.analysis.plan_candidates import attention_label
from shardlib.analysis.planner import MeshPlan
from shardlib.training.config import Config


def why_best(best: MeshPlan, other: MeshPlan) -> str:
    """One sentence on why ``best`` beats ``other``."""
    a, b = best.time, other.time
    parts = []
    if b.compute_s > a.compute_s * 1.01:
        why = "its devices split less of the work"
        if other.bubble > best.bubble + 0.01:
            recomputes = other.cfg.pipeline.recompute
            why = f"its pipeline idles {other.bubble:.0%} of the step" + (" and recomputes each forward" * recomputes)
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
    """``dr8 d4 m2 hsdp_tp ga1`` / ``d4 p2 tp 1f1b m16 v2`` (``d4 s2 ring dp ga1`` with ``--attention``): the
    plan in a table cell (legend printed)."""
    mesh = " ".join(f"{_SHORT[a]}{n}" for a, n in plan.sizes.items() if n > 1) or "1"
    if plan.weighs_attention and plan.sizes["seq"] > 1:  # --attention: which one over seq
        mesh += attention_label(plan.cfg)
    if plan.sizes["pipe"] == 1:
        return f"{mesh} {plan.sharding} ga{plan.cfg.grad_accum}"
    p = plan.cfg.pipeline
    chunks = f" v{p.virtual_stages}" if p.virtual_stages > 1 and p.schedule != "zb-v" else ""
    schedule = {"interleaved-1f1b": "i1f1b"}.get(p.schedule, p.schedule)
    kept = "" if p.recompute else " kept"  # forwards keep their residuals (pipeline.recompute false)
    return f"{mesh} {plan.sharding} {schedule} m{p.microbatches}{chunks}{kept}"


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
    from shardlib.analysis.planner_diloco import format_diloco, propose_diloco  # (it imports this module)
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
            "   v chunks per stage, i1f1b interleaved 1F1B, kept: no recomputed forwards; TFLOP/s and MFU",
            "   per device, of the model's FLOPs)",
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
