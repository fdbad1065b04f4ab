"""``python -m shardlib.analysis.report``: what every step costs, from the compiled program and the analytic model.

    python -m shardlib.analysis.report --config configs/small.yaml --mesh meshes/cpu-8.yaml
    python -m shardlib.analysis.report --config configs/1b.yaml --mesh meshes/gpu-8.yaml --devices 8 --hardware h100
    python -m shardlib.analysis.report --config configs/tiny.yaml --sweep seq_len=64,128,256 --plots runs/report

Compiles the real training step on the mesh (emulated CPU devices with
``--devices N``) without running it, and prints communication per mesh axis
and per collective kind beside the analytic model, memory and FLOPs, and a
time estimate for a hardware profile. ``--no-compile`` prints the analytic
part only (any mesh size, instantly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence

import jax

from shardlib.core.mesh import MESH_AXES, MeshSpec, build_mesh, format_sizes, mesh_spec, prepare_devices
from shardlib.core.rules import PRESETS
from shardlib.training.config import load_config


def mesh_sizes(spec: MeshSpec, devices: int | None) -> dict[str, int]:
    """Total size of every axis (within host x across hosts), resolving a -1 against ``devices``."""
    across = {a: spec.across_hosts[a] for a in MESH_AXES}
    within = dict(spec.within_host)
    if -1 in within.values() or -1 in across.values():
        if devices is None:
            raise ValueError(f"mesh {spec.name!r} has a -1 axis: give --devices N to size it")
        fixed = math.prod(v for v in (*within.values(), *across.values()) if v != -1)
        if devices % fixed:
            raise ValueError(f"mesh {spec.name!r}: {devices} devices do not divide into its fixed axes ({fixed})")
        fill = devices // fixed
        within = {a: fill if v == -1 else v for a, v in within.items()}
        across = {a: fill if v == -1 else v for a, v in across.items()}
    return {a: within[a] * across[a] for a in MESH_AXES}


def compile_mesh(spec: MeshSpec, sizes: dict[str, int], emulated: bool) -> jax.sharding.Mesh:
    """The mesh to compile on: one flat mesh of all devices of one process (hosts only matter for links)."""
    if jax.process_count() > 1 and not emulated:
        return build_mesh(spec)
    platform = "cpu" if emulated else spec.platform
    flat = dataclasses.replace(mesh_spec(**sizes), platform=platform, name=spec.name)
    devices = jax.devices(platform) if platform else jax.devices()
    return build_mesh(flat, devices[: math.prod(sizes.values())])


_MEASURED: dict[str, object] = {}  # one compile per distinct config (a sweep may repeat the base one)


def _report(args, cfg, sizes, spec, mesh, profile):
    from shardlib.analysis.report.layout import resolve_layout
    from shardlib.analysis.report.measure import measure
    from shardlib.analysis.report.report import build_report

    layout = resolve_layout(cfg, sizes, args.sharding)
    if args.sharding:
        cfg = cfg.model_copy(update={"sharding": args.sharding})
    measured = None
    if mesh is not None:
        key = cfg.model_dump_json() + repr(sorted(mesh.shape.items()))
        if key not in _MEASURED:
            _MEASURED[key] = measure(cfg, mesh)
        measured = _MEASURED[key]
    return build_report(
        layout,
        config=args.config,
        mesh=spec.name,
        measured=measured,
        profile=profile,
        mfu=args.mfu,
        across=dict(spec.across_hosts),
    )


def _parse_sweep(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise ValueError(f"--sweep wants key=v1,v2,... (e.g. seq_len=512,1024,2048), got {text!r}")
    return key.strip(), items


def _sweep_configs(args: argparse.Namespace, key: str, values: list[str], sizes: dict[str, int]) -> list:
    """Every swept config, validated and laid out on the mesh before anything compiles.

    The overrides go through the same machinery as the command line's
    (``apply_overrides``, ``validate_config``), so an unknown key or a bad
    value fails here, naming the key and the value, not after minutes of
    compiling the values before it.
    """
    from shardlib.analysis.report.layout import resolve_layout

    configs = []
    for value in values:
        try:
            swept = load_config(args.config, [*args.overrides, f"{key}={value}"])
            resolve_layout(swept, sizes, args.sharding)
        except ValueError as err:
            raise ValueError(f"--sweep {key}={value}: {err}") from None
        configs.append(swept)
    return configs


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    """The closest ancestor that exists: what decides whether the missing directories can be made."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: pathlib.Path, flag: str, *, directory: bool) -> None:
    """Raises ValueError unless ``path`` (a file, or a ``directory``) can be written.

    Checked before compiling, so a typo in ``--json``/``--plots`` costs a
    second, not the compile; a file where a directory must be (or the
    reverse) and an unwritable ancestor are the usual mistakes.
    """
    if path.exists() and path.is_dir() != directory:
        want = "a directory" if directory else "a file"
        raise ValueError(f"cannot write {flag} {path}: it exists and is not {want}")
    ancestor = _nearest_existing(path if directory else path.parent)
    if not ancestor.is_dir():
        raise ValueError(f"cannot write {flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {flag} {path}: {ancestor} is not writable")


def _json_value(value: object) -> object:
    """What JSON cannot hold as is: sets (e.g. a permute's device pairs) as sorted lists, numbers as floats."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    return float(value)


def _write_json(document: dict, path: pathlib.Path) -> None:
    """Writes the report; a failure the early check could not foresee (disk full) is still one error line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=_json_value))
    except OSError as err:
        raise ValueError(f"cannot write --json {path}: {err.strerror or err}") from None


def _write_plots(report, sweep, reports, out: pathlib.Path) -> list[pathlib.Path]:
    """The PNGs of ``--plots``; an OS error while saving becomes one error line naming the directory."""
    from shardlib.analysis.report.plots import plot_bytes, plot_message_sizes, plot_sweep

    try:
        written = [plot_bytes(report, out / "bytes.png"), plot_message_sizes(report, out / "message_sizes.png")]
        if sweep:
            name = f"sweep_{sweep[0].replace('.', '_')}.png"
            written.append(plot_sweep(sweep[0], _numbers(sweep[1]), reports, out / name))
    except OSError as err:
        raise ValueError(f"cannot write --plots {out}: {err.strerror or err}") from None
    return written


def _main(args: argparse.Namespace) -> int:
    from shardlib.analysis.report.hardware import load_profile
    from shardlib.analysis.report.report import check_mfu
    from shardlib.analysis.report.views import format_report, report_json
    from shardlib.training.cli import load_run

    check_mfu(args.mfu)
    if args.json:
        check_writable(pathlib.Path(args.json), "--json", directory=False)
    if args.plots:
        check_writable(pathlib.Path(args.plots), "--plots", directory=True)
    cfg, spec = load_run(args)
    sizes = mesh_sizes(spec, args.devices)
    total = math.prod(sizes.values())
    if args.devices is not None and args.devices != total:
        raise ValueError(
            f"mesh {spec.name!r} has {total} devices ({format_sizes(sizes)}) but --devices is {args.devices}"
        )
    sweep = _parse_sweep(args.sweep) if args.sweep else None
    swept = _sweep_configs(args, *sweep, sizes) if sweep else []
    profile = load_profile(args.hardware) if args.hardware else None
    emulated = args.devices is not None or spec.platform == "cpu"
    if emulated:  # a multi-host CPU mesh (cpu-2x4) compiles on all its devices in this one process
        prepare_devices(dataclasses.replace(spec, platform="cpu", emulate_cpu_devices=total))
    mesh = None if args.no_compile else compile_mesh(spec, sizes, emulated)

    report = _report(args, cfg, sizes, spec, mesh, profile)
    print(format_report(report))
    document = report_json(report)
    reports = []
    if sweep:
        key, values = sweep
        print(f"\nsweep over {key}: wire bytes per device per step, by axis (measured / predicted)")
        for value, swept_cfg in zip(values, swept, strict=True):
            reports.append(_report(args, swept_cfg, sizes, spec, mesh, profile))
            cells = (
                ", ".join(f"{r.axis} {_mib(r.measured)}/{_mib(r.predicted)} MiB" for r in reports[-1].axes)
                or "no communication"
            )
            print(f"  {key}={value}: {cells}")
        document["sweep"] = {"key": key, "values": values, "reports": [report_json(r) for r in reports]}
    if args.json:
        _write_json(document, pathlib.Path(args.json))
        print(f"\nwrote {args.json}")
    if args.plots:
        written = _write_plots(report, sweep, reports, pathlib.Path(args.plots))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.3f}"


def _numbers(values: list[str]) -> list[object]:
    out = []
    for v in values:
        try:
            out.append(float(v) if "." in v or "e" in v.lower() else int(v))
        except ValueError:
            out.append(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from shardlib.training.cli import add_run_arguments, run_guarded

    parser = argparse.ArgumentParser(prog="python -m shardlib.analysis.report", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--sharding", choices=sorted(PRESETS), help="preset to report (default: the config's)")
    parser.add_argument("--hardware", help="hardware profile for the time estimate: h100, h200 or a YAML file")
    parser.add_argument("--mfu", type=float, help="utilisation for compute time (default: the profile's)")
    parser.add_argument("--sweep", help="key=v1,v2,...: report each value of a config key (e.g. seq_len=512,1024)")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--plots", help="write PNG plots into this directory")
    parser.add_argument("--no-compile", action="store_true", help="analytic model only: compile nothing")
    return run_guarded(_main, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
