"""Where every parameter lives: a table from the rules, without training anything.

    python -m shardlib.describe --config configs/tiny.yaml --mesh meshes/cpu-8.yaml

prints the rule table, one row per parameter (path, shape, logical axes,
PartitionSpec, bytes per device) and totals, and warns about what usually
means a mistake: a sharded preset that leaves more than 2% of parameter bytes
replicated, or a mesh axis that neither parameters nor the batch use.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from shardlib.rules import Rules, format_rules, logical_to_spec
from shardlib.sharding import is_logical_axes, path_str, tree_specs

REPLICATED_WARN_FRACTION = 0.02


@dataclasses.dataclass(frozen=True)
class ParamRow:
    path: str
    shape: tuple[int, ...]
    dtype: str
    logical_axes: tuple[str | None, ...]
    spec: PartitionSpec
    bytes_total: int
    bytes_per_device: int

    @property
    def replicated(self) -> bool:
        return all(axis is None for axis in self.spec)


@dataclasses.dataclass(frozen=True)
class Description:
    """The resolved sharding of a parameter tree on a mesh."""

    rows: list[ParamRow]
    mesh_sizes: dict[str, int]
    rules: Rules
    warnings: list[str]

    @property
    def bytes_total(self) -> int:
        return sum(r.bytes_total for r in self.rows)

    @property
    def bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self.rows)

    @property
    def replicated_fraction(self) -> float:
        total = self.bytes_total
        return sum(r.bytes_total for r in self.rows if r.replicated) / total if total else 0.0

    def format(self, *, show_rules: bool = True) -> str:
        header = ("path", "shape", "logical axes", "PartitionSpec", "bytes/device")
        body = [
            (
                r.path,
                _shape(r.shape),
                _axes(r.logical_axes),
                _spec(r.spec),
                _bytes(r.bytes_per_device),
            )
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        out = []
        if show_rules:
            out += [
                "rules (first match wins):",
                *("  " + ln for ln in format_rules(self.rules).splitlines()),
                "",
            ]
        out += [line(header), line(["-" * w for w in widths]), *(line(row) for row in body)]
        devices = math.prod(self.mesh_sizes.values())
        out += [
            "",
            (
                f"parameters: {sum(math.prod(r.shape) for r in self.rows):,} ({_bytes(self.bytes_total)} total, "
                f"{_bytes(self.bytes_per_device)} per device on {devices} devices)"
            ),
            f"parameters + AdamW moments (sharded alike): {_bytes(3 * self.bytes_per_device)} per device",
            f"replicated: {100 * self.replicated_fraction:.1f}% of parameter bytes",
        ]
        out += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(out)


def golden_table(desc: Description) -> str:
    """The stable part of a description (path, shape, logical axes, spec), for golden files."""
    return "\n".join(f"{r.path}  {_shape(r.shape)}  {_axes(r.logical_axes)}  {_spec(r.spec)}" for r in desc.rows) + "\n"


def describe(
    params: Any,
    logical_axes: Any,
    rules: Rules,
    mesh: jax.sharding.Mesh,
    *,
    batch_axes: Sequence[str | None] = ("batch",),
) -> Description:
    """Resolves every parameter's sharding and collects warnings.

    Args:
      params: pytree of arrays or ShapeDtypeStructs.
      logical_axes: same structure, leaves are tuples of logical names.
      rules: the rule table; mesh: the mesh to resolve against.
      batch_axes: the logical axes of the batch, to tell whether a mesh axis
        is used by data parallelism.
    """
    sizes = dict(mesh.shape)
    specs = tree_specs(params, logical_axes, rules, mesh)
    rows = []
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = jax.tree.leaves(logical_axes, is_leaf=is_logical_axes)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (keypath, leaf), axes, spec in zip(flat_params, flat_axes, flat_specs, strict=True):
        total = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        parts = math.prod(sizes[a] for a in _spec_axes(spec))
        rows.append(
            ParamRow(
                path_str(keypath),
                tuple(leaf.shape),
                str(np.dtype(leaf.dtype)),
                tuple(axes),
                spec,
                total,
                total // parts,
            )
        )

    warnings = []
    desc = Description(rows, sizes, rules, warnings)
    param_axes = {a for r in rows for a in _spec_axes(r.spec)}
    if param_axes and desc.replicated_fraction > REPLICATED_WARN_FRACTION:
        largest = sorted((r for r in rows if r.replicated), key=lambda r: -r.bytes_total)[:3]
        warnings.append(
            f"{100 * desc.replicated_fraction:.1f}% of parameter bytes are replicated although the rules shard "
            f"parameters over {', '.join(sorted(param_axes))} (largest: {', '.join(r.path for r in largest)})"
        )
    batch_spec = logical_to_spec(tuple(batch_axes), rules, mesh)
    used = param_axes | set(_spec_axes(batch_spec))
    for axis, size in sizes.items():
        if size > 1 and axis not in used:
            warnings.append(
                f"mesh axis {axis!r} (size {size}) shards neither parameters nor the batch: "
                f"the {size} devices along it repeat each other's work"
            )
    return desc


def _spec_axes(spec: PartitionSpec) -> list[str]:
    out = []
    for entry in spec:
        if entry is not None:
            out += [entry] if isinstance(entry, str) else list(entry)
    return out


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _axes(axes: tuple[str | None, ...]) -> str:
    return "(" + ", ".join(str(a) for a in axes) + ")"


def _spec(spec: PartitionSpec) -> str:
    return "P(" + ", ".join("None" if e is None else repr(e) for e in spec) + ")"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _describe_main(args: argparse.Namespace) -> int:
    from shardlib.cli import load_run
    from shardlib.mesh import build_mesh, describe_mesh
    from shardlib.rules import preset_rules
    from shardlib.train_state import abstract_model

    cfg, spec = load_run(args)
    mesh = build_mesh(spec)
    preset = args.sharding or cfg.sharding
    model = abstract_model(cfg.model)
    desc = describe(model.params, model.logical_axes, preset_rules(preset), mesh)
    print(f"config {args.config} | mesh {describe_mesh(mesh)} | preset {preset}\n")
    print(desc.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from shardlib.cli import add_run_arguments, run_guarded
    from shardlib.rules import PRESETS

    parser = argparse.ArgumentParser(prog="python -m shardlib.describe", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--sharding", choices=sorted(PRESETS), help="preset to describe (default: the config's)")
    return run_guarded(_describe_main, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
