"""Bytes per step against the minimum, for every preset on every shipped mesh: one compile per case.

    python bench/comms.py [--configs configs/tiny.yaml,configs/small.yaml] [--meshes meshes/*.yaml]
                          [--presets dp,fsdp,tp,fsdp_tp,hsdp,hsdp_tp] [--variants base,accum4,vocab8192]
                          (Ulysses: --meshes meshes/cpu-8-seq.yaml --variants ulysses,ulysses2)
                          [--memory] [--json out.json]

For each (config, mesh, preset), and on a mesh with ``pipe`` for each pipeline
schedule, compiles the train step (nothing runs) and prints, per mesh axis,
the wire bytes per device per step that the compiled program moves
(``shardlib.analysis.report.measure``), the analytic minimum
(``shardlib.analysis.report.analytic``) and their ratio; "w/o avoidable" is
the ratio once the excess the report attributes to a named XLA:CPU pattern
(an all-reduce only sliced, addends reduced one by one) is taken out: what
XLA:GPU's passes would leave. "step MiB" is the compiled step's arguments and
temporaries per device; with ``--memory``, "XLA red." is the same step with
the partitioner's gradient reductions instead of the step's own (the layout
before the step reduced them itself; the README says where they differ).
Every mesh compiles on emulated CPU devices, GPU
meshes included (the program is partitioned the same way; XLA:GPU's own
passes are not run). A case the plan refuses prints the reason in one line; the
HSDP presets run only on meshes that split data into ``data_replica`` groups.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PIPELINES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2))
# Each case also runs as these variants: gradient accumulation (one all-reduce per step, not per
# microbatch), and a vocabulary larger than a device's tokens (the lookup moves token ids, not the table).
VARIANTS = {"base": [], "accum4": ["grad_accum=4"], "vocab8192": ["model.vocab_size=8192"]}
# Ulysses attention on the meshes that split the sequence: all of seq, and the hybrid (the ring across pairs).
SEQ_VARIANTS = {
    "ulysses": ["attention.impl=ulysses"],
    "ulysses2": ["attention.impl=ulysses", "attention.ulysses_degree=2"],
}
VARIANTS |= SEQ_VARIANTS


def cases(configs, meshes, presets, variants=("base",)):
    """(config path, mesh path, preset, overrides) in the order printed."""
    for variant in variants:
        for config, mesh_path, preset, overrides in _base_cases(configs, meshes, presets):
            if variant == "accum4" and any("pipeline" in o for o in overrides):
                continue  # a pipeline accumulates over its own microbatches (grad_accum 1)
            if variant in SEQ_VARIANTS and _seq_size(mesh_path) < 2 * (variant == "ulysses2") + 2:
                continue  # Ulysses needs seq > 1 (the hybrid seq >= 4: pairs, and a ring of two or more)
            yield config, mesh_path, preset, [*overrides, *VARIANTS[variant]]


def _seq_size(mesh_path: str) -> int:
    from shardlib.core.mesh import load_mesh_spec

    spec = load_mesh_spec(mesh_path)
    return spec.within_host.get("seq", 1) * spec.across_hosts.get("seq", 1)


def _base_cases(configs, meshes, presets):
    from shardlib.core.mesh import load_mesh_spec
    from shardlib.core.rules import PRESETS as PRESET_INTENTS

    for config in configs:
        for mesh_path in meshes:
            spec = load_mesh_spec(mesh_path)
            pipe = spec.within_host.get("pipe", 1) * spec.across_hosts.get("pipe", 1) > 1
            replicas = spec.within_host.get("data_replica", 1) * spec.across_hosts.get("data_replica", 1) > 1
            for preset in presets:
                if PRESET_INTENTS[preset].hierarchical and not replicas:
                    continue  # HSDP needs a mesh that splits data; elsewhere the plan refuses it
                if not pipe:
                    yield config, mesh_path, preset, []
                    continue
                for schedule, virtual in PIPELINES:
                    yield (
                        config,
                        mesh_path,
                        preset,
                        [
                            f"pipeline.schedule={schedule}",
                            f"pipeline.virtual_stages={virtual}",
                            "pipeline.microbatches=4",
                        ],
                    )


def measure_case(config, mesh_path, preset, overrides, memory=False):
    """(label, [(axis, measured, minimum, ratio, ratio without avoidable)], (step MiB, partitioner's MiB))
    or (label, refusal, None). The step's memory is its compiled arguments and temporaries per device;
    ``memory``: also the same step with the partitioner's gradient reductions (``reduce_per_use`` off),
    the layout before the step reduced them itself."""
    from shardlib.analysis.report.__main__ import compile_mesh, mesh_sizes
    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.analysis.report.measure import measure
    from shardlib.analysis.report.report import build_report
    from shardlib.core.mesh import load_mesh_spec
    from shardlib.training.cli import USER_ERRORS
    from shardlib.training.config import load_config

    spec = load_mesh_spec(mesh_path)
    sizes = mesh_sizes(spec, None)
    label = f"{os.path.basename(config)} {os.path.basename(mesh_path)} {preset}" + "".join(
        f" {o.split('=')[1]}" for o in overrides if "schedule" in o
    )
    label += "".join(f" {o}" for o in overrides if not o.startswith("pipeline."))
    try:
        cfg = load_config(config, [f"sharding={preset}", *overrides])
        mesh = compile_mesh(spec, sizes, emulated=True)
        measured = measure(cfg, mesh)
        report = build_report(resolve_layout(cfg, sizes), measured=measured)
    except USER_ERRORS as err:  # a refused combination: its one-line reason, as train.py would print it
        return label, f"refused: {str(err).splitlines()[0][:140]}", None
    rows = [(r.axis, r.measured, r.predicted, r.ratio, r.ratio_without_avoidable) for r in report.axes]
    held = _held_mib(measured.memory)
    return label, rows, (held, _partitioner_mib(cfg, mesh) if memory else None)


def _held_mib(memory) -> float | None:
    return None if memory is None else (memory.arguments + memory.temporaries) / 2**20


def _partitioner_mib(cfg, mesh) -> float | None:
    """The step's memory with the partitioner's gradient reductions instead of its own (none in a pipeline)."""
    import dataclasses

    import jax

    from shardlib.analysis.report.measure import abstract_batch, compiled_memory
    from shardlib.training.parallel_plan import build_plan
    from shardlib.training.setup import setup_training
    from shardlib.training.train_state import abstract_state

    plan = build_plan(cfg, mesh)
    if not plan.reduce_per_use:
        return None
    run = setup_training(cfg, mesh, dataclasses.replace(plan, reduce_per_use=False))
    with jax.set_mesh(mesh):
        state = abstract_state(run.model, run.tx, run.shardings)
        compiled = run.train_step.lower(*state, abstract_batch(cfg, run.batch_sharding)).compile()
    return _held_mib(compiled_memory(compiled))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="configs/tiny.yaml,configs/small.yaml")
    parser.add_argument("--meshes", default=",".join(sorted(glob.glob("meshes/*.yaml"))))
    parser.add_argument("--presets", default="dp,fsdp,tp,fsdp_tp,hsdp,hsdp_tp")
    parser.add_argument("--variants", default="base,accum4,vocab8192", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--memory", action="store_true", help="also compile each step with the partitioner's reductions"
    )
    parser.add_argument("--json", help="write every row as JSON to this file")
    args = parser.parse_args(argv)

    import jax

    meshes = args.meshes.split(",")
    from shardlib.analysis.report.__main__ import mesh_sizes
    from shardlib.core.mesh import load_mesh_spec

    devices = max(math.prod(mesh_sizes(load_mesh_spec(m), None).values()) for m in meshes)
    jax.config.update("jax_num_cpu_devices", devices)

    print(
        f"{'case':<72}{'axis':>13}{'measured KiB':>14}{'min KiB':>11}{'ratio':>8}{'w/o avoid.':>11}"
        f"{'step MiB':>10}{'XLA red.':>10}"
    )
    out = []
    for case in cases(args.configs.split(","), meshes, args.presets.split(","), args.variants.split(",")):
        label, rows, memory = measure_case(*case, memory=args.memory)
        if isinstance(rows, str):
            print(f"{label:<72}  {rows}")
            out.append({"case": label, "refused": rows})
            continue
        held, partitioner = memory
        mem = f"{_mib(held):>10}{_mib(partitioner):>10}"
        if not rows:
            print(f"{label:<72}  no communication{mem:>70}")
        for i, (axis, measured, minimum, ratio, clean) in enumerate(rows):
            print(
                f"{label if i == 0 else '':<72}{axis:>13}{(measured or 0) / 1024:>14,.1f}{minimum / 1024:>11,.1f}"
                f"{_ratio(ratio):>8}{_ratio(clean):>11}{mem if i == 0 else ''}",
                flush=True,
            )
        out.append(
            {
                "case": label,
                "axes": [dict(zip(("axis", "measured", "minimum", "ratio", "clean"), r)) for r in rows],
                "step_mib": held,
                "partitioner_mib": partitioner,
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
