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

Without a pipeline a mesh takes the fewest microbatches (``grad_accum`` dividing the batch) that
fit. ``--mesh FILE`` evaluates the config on that one mesh (its ``across_hosts`` deciding the
links) instead of searching. The printed and ``--json`` views are ``planner_output``'s; the DiLoCo
proposal for a plan whose data-parallel axis crosses hosts is ``planner_diloco``'s.

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
    attention_label,
    attention_variants,
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
    weighs_attention: bool = False  # --attention: the label names the attention over seq

    @property
    def label(self) -> str:
        shown = " x ".join(f"{a}={n}" for a, n in self.sizes.items() if n > 1) or "1 device"
        attention = attention_label(self.cfg) if self.weighs_attention and self.sizes["seq"] > 1 else ""
        return f"{shown} {self.sharding}{attention}{variant_label(self.cfg, self.sizes)}"

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
    attention: Sequence[str] = (),
) -> list[MeshPlan]:
    """All plans for ``cfg`` on ``devices``: ranked fitting ones first, then the dropped ones.

    ``attention``: the attentions over ``seq`` to weigh beside the config's own where ``seq > 1``
    (``plan_candidates.SEQ_ATTENTION``); none: the config's own only."""
    plans = []
    for flat in candidate_meshes(devices, planned_axes(cfg, axes)):
        for sharding in presets:
            # An HSDP preset keeps data's FSDP inside a host and replicates across hosts.
            sizes = hierarchical_mesh(flat, profile.devices_per_host) if PRESETS[sharding].hierarchical else flat
            for attended in attention_variants(cfg, sizes, attention):
                variants = [
                    MeshPlan(
                        sizes, sharding, v.model_copy(update={"sharding": sharding}), weighs_attention=bool(attention)
                    )
                    for v in config_variants(attended, sizes)
                ]
                if sizes["pipe"] > 1:
                    for plan in variants:
                        evaluate_plan(plan, profile, mfu)
                    plans += variants
                else:
                    plans.append(_fewest_fitting(variants, attended.grad_accum, profile, mfu))
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
    from shardlib.analysis.planner_output import _gib
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
    from shardlib.analysis.planner_output import format_plans, plans_json
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
        attention = args.attention.split(",") if args.attention else ()
        plans = make_plans(cfg, devices, profile, presets=presets, axes=axes, mfu=args.mfu, attention=attention)
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
    parser.add_argument(
        "--attention",
        help="comma-separated attentions over seq to weigh where seq > 1, beside the config's own: ring, allgather, "
        "ulysses, hybrid (Ulysses at each degree below seq, the ring across)",
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
