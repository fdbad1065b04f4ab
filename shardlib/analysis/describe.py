"""Where every parameter lives: a table from the rules, without training anything.

    python -m shardlib.analysis.describe --config configs/tiny.yaml --mesh meshes/cpu-8.yaml

prints the rule table, one row per parameter (path, shape, logical axes,
PartitionSpec, bytes per device) and totals, and warns about what usually
means a mistake: a sharded preset that leaves more than 2% of parameter bytes
replicated, or a mesh axis that neither parameters nor activations use (the
batch over ``data``, the sequence's ``length`` over ``seq``).
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

from shardlib.core.rules import Rules, format_rules, logical_to_spec, spec_axes
from shardlib.core.sharding import is_logical_axes, path_str, tree_specs
from shardlib.core.units import format_bytes

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
                format_bytes(r.bytes_per_device),
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
                f"parameters: {sum(math.prod(r.shape) for r in self.rows):,} ({format_bytes(self.bytes_total)} total, "
                f"{format_bytes(self.bytes_per_device)} per device on {devices} devices)"
            ),
            f"parameters + AdamW moments (sharded alike): {format_bytes(3 * self.bytes_per_device)} per device",
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
    batch_axes: Sequence[str | None] = ("batch", "length"),
) -> Description:
    """Resolves every parameter's sharding and collects warnings.

    Args:
      params: pytree of arrays or ShapeDtypeStructs.
      logical_axes: same structure, leaves are tuples of logical names.
      rules: the rule table; mesh: the mesh to resolve against.
      batch_axes: the logical axes of the activations' token dimensions
        (batch and sequence length), to tell whether a mesh axis is used by
        data or sequence parallelism: ``seq`` shards no parameter, only the
        activations' ``length``.
    """
    sizes = dict(mesh.shape)
    specs = tree_specs(params, logical_axes, rules, mesh)
    rows = []
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = jax.tree.leaves(logical_axes, is_leaf=is_logical_axes)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (keypath, leaf), axes, spec in zip(flat_params, flat_axes, flat_specs, strict=True):
        total = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        parts = math.prod(sizes[a] for a in spec_axes(spec))
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
    param_axes = {a for r in rows for a in spec_axes(r.spec)}
    if param_axes and desc.replicated_fraction > REPLICATED_WARN_FRACTION:
        largest = sorted((r for r in rows if r.replicated), key=lambda r: -r.bytes_total)[:3]
        warnings.append(
            f"{100 * desc.replicated_fraction:.1f}% of parameter bytes are replicated although the rules shard "
            f"parameters over {', '.join(sorted(param_axes))} (largest: {', '.join(r.path for r in largest)})"
        )
    known = {name for name, _ in rules}  # a hand-written table may not name `length`: it then splits nothing
    activation_spec = logical_to_spec(tuple(a for a in batch_axes if a in known), rules, mesh)
    used = param_axes | set(spec_axes(activation_spec))
    for axis, size in sizes.items():
        if size > 1 and axis not in used:
            # "the batch": the tokens of the activations, their batch and their length dimensions alike
            warnings.append(
                f"mesh axis {axis!r} (size {size}) shards neither parameters nor the batch: "
                f"the {size} devices along it repeat each other's work"
            )
    return desc


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _axes(axes: tuple[str | None, ...]) -> str:
    return "(" + ", ".join(str(a) for a in axes) + ")"


def _spec(spec: PartitionSpec) -> str:
    return "P(" + ", ".join("None" if e is None else repr(e) for e in spec) + ")"


def _describe_main(args: argparse.Namespace) -> int:
    from shardlib.core.mesh import build_mesh, describe_mesh
    from shardlib.training.cli import load_run
    from shardlib.training.parallel_plan import build_plan
    from shardlib.training.train_state import abstract_model

    cfg, spec = load_run(args)
    if args.sharding:
        cfg = cfg.model_copy(update={"sharding": args.sharding})
    mesh = build_mesh(spec)
    plan = build_plan(cfg, mesh)
    model = abstract_model(cfg.model)
    desc = describe(model.params, model.logical_axes, plan.rules, mesh)
    print(f"config {args.config} | mesh {describe_mesh(mesh)} | preset {plan.preset}\n")
    print(desc.format())
    print()
    print(plan.describe())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from shardlib.core.rules import PRESETS
    from shardlib.training.cli import add_run_arguments, run_guarded

    compat_only = argparse.ArgumentParser(add_help=False)
    compat_only.add_argument("--compat", action="store_true")
    if compat_only.parse_known_args(argv)[0].compat:
        from shardlib.parallel.compat import format_matrix

        print(format_matrix())
        return 0
    parser = argparse.ArgumentParser(prog="python -m shardlib.analysis.describe", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compat", action="store_true", help="print which parallel features compose (no config needed) and exit"
    )
    add_run_arguments(parser)
    parser.add_argument("--sharding", choices=sorted(PRESETS), help="preset to describe (default: the config's)")
    return run_guarded(_describe_main, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
