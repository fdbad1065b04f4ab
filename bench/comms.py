"""Bytes per step against the minimum, for every preset on every shipped mesh: one compile per case.

    python bench/comms.py [--configs configs/tiny.yaml,configs/small.yaml] [--meshes meshes/*.yaml]
                          [--presets dp,fsdp,tp,fsdp_tp,hsdp,hsdp_tp] [--json out.json]

For each (config, mesh, preset), and on a mesh with ``pipe`` for each pipeline
schedule, compiles the train step (nothing runs) and prints, per mesh axis,
the wire bytes per device per step that the compiled program moves
(``shardlib.analysis.report.measure``), the analytic minimum
(``shardlib.analysis.report.analytic``) and their ratio; "w/o avoidable" is
the ratio once the excess the report attributes to a named XLA:CPU pattern
(an all-reduce only sliced, addends reduced one by one) is taken out: what
XLA:GPU's passes would leave. Every mesh compiles on emulated CPU devices, GPU
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


def cases(configs, meshes, presets):
    """(config path, mesh path, preset, overrides) in the order printed."""
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


def measure_case(config, mesh_path, preset, overrides):
    """(label, [(axis, measured, minimum, ratio, ratio without avoidable)]) or (label, refusal)."""
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
    try:
        cfg = load_config(config, [f"sharding={preset}", *overrides])
        mesh = compile_mesh(spec, sizes, emulated=True)
        report = build_report(resolve_layout(cfg, sizes), measured=measure(cfg, mesh))
    except USER_ERRORS as err:  # a refused combination: its one-line reason, as train.py would print it
        return label, f"refused: {str(err).splitlines()[0][:140]}"
    rows = [(r.axis, r.measured, r.predicted, r.ratio, r.ratio_without_avoidable) for r in report.axes]
    return label, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="configs/tiny.yaml,configs/small.yaml")
    parser.add_argument("--meshes", default=",".join(sorted(glob.glob("meshes/*.yaml"))))
    parser.add_argument("--presets", default="dp,fsdp,tp,fsdp_tp,hsdp,hsdp_tp")
    parser.add_argument("--json", help="write every row as JSON to this file")
    args = parser.parse_args(argv)

    import jax

    meshes = args.meshes.split(",")
    from shardlib.analysis.report.__main__ import mesh_sizes
    from shardlib.core.mesh import load_mesh_spec

    devices = max(math.prod(mesh_sizes(load_mesh_spec(m), None).values()) for m in meshes)
    jax.config.update("jax_num_cpu_devices", devices)

    print(f"{'case':<46}{'axis':>13}{'measured KiB':>14}{'min KiB':>11}{'ratio':>8}{'w/o avoid.':>11}")
    out = []
    for case in cases(args.configs.split(","), meshes, args.presets.split(",")):
        label, rows = measure_case(*case)
        if isinstance(rows, str):
            print(f"{label:<46}  {rows}")
            out.append({"case": label, "refused": rows})
            continue
        if not rows:
            print(f"{label:<46}  no communication")
        for i, (axis, measured, minimum, ratio, clean) in enumerate(rows):
            print(
                f"{label if i == 0 else '':<46}{axis:>13}{(measured or 0) / 1024:>14,.1f}{minimum / 1024:>11,.1f}"
                f"{_ratio(ratio):>8}{_ratio(clean):>11}",
                flush=True,
            )
        out.append(
            {"case": label, "axes": [dict(zip(("axis", "measured", "minimum", "ratio", "clean"), r)) for r in rows]}
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
