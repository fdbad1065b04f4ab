"""Sharding rules: one ordered table from logical axis names to mesh axes.

A rule is a pair ``(logical name, mesh axis | tuple of mesh axes | None)``, the
format Flax uses, so ``flax.nnx.logical_axis_rules(rules)`` accepts a table
unchanged. Flax resolves a table differently, though: NNX builds a dict from it
(the *last* rule for a name wins, so fallbacks are lost) and Linen walks rules
rather than dimensions; use ``logical_to_spec`` for the semantics below.
Resolution of one tensor's logical axes, dimension by dimension,
left to right:

* the rules for the dimension's name are tried in table order (a name may
  appear several times: later entries are fallbacks);
* mesh axes already taken by an earlier dimension of the same tensor are
  skipped; a rule left with no axes at all falls through to the next rule for
  that name, and if there is none, resolution fails (two dimensions would
  share a mesh axis);
* the first rule that remains wins; ``None`` means replicated;
* mesh axes of size 1 are dropped from the spec, so one table serves every
  mesh;
* the dimension's size must divide by the product of its mesh axes.

Presets are compiled from intent (``ShardingIntent``) rather than written by
hand, so data, FSDP and tensor parallelism combine without copy-paste tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.core.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None
"""What a rule maps a logical name to: one mesh axis, several (outermost first), or ``None`` (replicated)."""
Rule = tuple[str, MeshAxes]
"""One rule: ``(logical name, mesh axes)``."""
Rules = tuple[Rule, ...]
"""An ordered rule table; the first rule for a name that still has free mesh axes wins."""
LogicalAxes = tuple[str | None, ...]


class ShardingError(ValueError):
    """A tensor cannot be sharded as its logical axes and the rules say."""


class ShardingWarning(UserWarning):
    """Something that usually means a mistake but may be intended (an over-matching pattern)."""


@dataclasses.dataclass(frozen=True)
class ShardingIntent:
    """What a user wants, in mesh axes; ``compile_rules`` turns it into a table.

    batch:  mesh axes the batch is split over (data parallelism). ``expert``
            doubles as a data axis for the non-expert layers, as peers do;
            ``data_replica`` is the outer part of data (HSDP), and nothing
            but the batch is ever split over it.
    fsdp:   mesh axes parameters and optimizer state are split over along
            their ``embed`` dimension (ZeRO-3); XLA gathers them per layer.
    tensor: mesh axes for Megatron tensor parallelism: heads and the MLP
            hidden dimension are split, so attention and the MLP each run
            column-parallel then row-parallel with one all-reduce forward and
            one backward; the vocabulary is split too.
    hierarchical: the preset is HSDP: it needs a mesh that splits data into
            ``data_replica`` groups of more than one ``data`` device each
            (``check_mesh_fits_intent``). Its table is the FSDP preset's: on
            such a mesh FSDP is hierarchical anyway; the name says it is
            meant, so a flat mesh is an error, not a silent ZeRO-3 over every
            data device, and so are groups of one device (data parallelism).
    """

    batch: tuple[str, ...] = ("data_replica", "data", "expert")
    fsdp: tuple[str, ...] = ()
    tensor: tuple[str, ...] = ()
    hierarchical: bool = False


PRESETS: dict[str, ShardingIntent] = {
    "dp": ShardingIntent(),
    "fsdp": ShardingIntent(fsdp=("data",)),
    "tp": ShardingIntent(tensor=("model",)),
    "fsdp_tp": ShardingIntent(fsdp=("data",), tensor=("model",)),
    "hsdp": ShardingIntent(fsdp=("data",), hierarchical=True),
    "hsdp_tp": ShardingIntent(fsdp=("data",), tensor=("model",), hierarchical=True),
}
"""The shipped presets' intents by name; ``preset_rules(name)`` compiles one into a rule table."""


def check_mesh_fits_intent(name: str, sizes: Mapping[str, int]) -> None:
    """Raises ``ShardingError`` when preset ``name`` needs a mesh axis ``sizes`` does not split.

    An HSDP preset needs both parts of data split: on a mesh without ``data_replica`` it would
    quietly be ZeRO-3 over all of data; on one with ``data=1`` (``{data_replica: 8}``) every group
    would hold whole parameters, plain data parallelism. ``sizes``: shardlib's axes (one absent: 1).
    """
    intent = PRESETS[name]
    if not intent.hierarchical:
        return
    replicas, data = sizes.get("data_replica", 1), sizes.get("data", 1)
    if replicas < 2:
        raise ShardingError(
            f"preset {name!r} keeps a copy of the parameters per data_replica group, but the mesh has "
            f"data_replica=1; use a mesh that splits data (data_replica: 2 in within_host or across_hosts, "
            f"as meshes/cpu-8-hsdp.yaml does), or preset {name.replace('hsdp', 'fsdp')!r} for FSDP over all of data"
        )
    if data < 2:
        flat = next(p for p, i in PRESETS.items() if i == ShardingIntent(tensor=intent.tensor))
        raise ShardingError(
            f"preset {name!r} shards the parameters over data inside each data_replica group, but the mesh has "
            f"data=1 (data_replica={replicas}): every group would hold them whole, which is data parallelism; "
            f"split data_replica into data_replica x data (as meshes/cpu-8-hsdp.yaml does), or preset {flat!r}"
        )


def _shardlib_axis_sizes(sizes: Mapping[str, int], mesh_axes: Mapping[str, MeshAxes]) -> dict[str, int]:
    """The size of each of shardlib's axes on a mesh of ``sizes``, read through ``mesh_axes`` (an axis
    renamed to several is their product, to None or one the mesh lacks 1)."""
    return {
        axis: math.prod(sizes.get(a, 1) for a in (axes_tuple(mesh_axes[axis]) if axis in mesh_axes else (axis,)))
        for axis in MESH_AXES
    }


def _axes_or_none(axes: tuple[str, ...]) -> MeshAxes:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def compile_rules(intent: ShardingIntent) -> Rules:
    """The rule table for an intent. Order matters: first match wins.

    ``layers -> pipe``, ``length -> seq`` and ``experts -> expert`` are always
    present; on a mesh where those axes have size 1 they vanish from specs.
    """
    tensor = _axes_or_none(intent.tensor)
    rules: list[Rule] = [
        ("batch", _axes_or_none(intent.batch)),
        ("length", "seq"),
        ("layers", "pipe"),
        ("experts", "expert"),
        ("vocab", tensor),
        ("heads", tensor),
        ("kv_heads", tensor),
        ("mlp", tensor),
    ]
    if intent.fsdp:
        rules.append(("embed", _axes_or_none(intent.fsdp)))
    # Activations carry `embed` beside `batch`; when FSDP already gave `data`
    # to the batch, this fallback keeps the residual stream replicated.
    rules.append(("embed", None))
    rules.append(("head_dim", None))
    return tuple(rules)


# Axes a preset names but a mesh may lack without changing its meaning: on a
# mesh without them they act as size 1 (nothing is split over them).
OPTIONAL_MESH_AXES: tuple[str, ...] = ("data_replica", "pipe", "expert", "seq")


def preset_rules(
    name: str,
    *,
    mesh: jax.sharding.Mesh | Mapping[str, int] | None = None,
    mesh_axes: Mapping[str, MeshAxes] | None = None,
) -> Rules:
    """The rule table of a named preset (``dp``, ``fsdp``, ``tp``, ``fsdp_tp``, ``hsdp``, ``hsdp_tp``).

    Presets name shardlib's mesh axes (``MESH_AXES``). For a project's own mesh (any
    ``jax.sharding.Mesh``, or its axis sizes), pass it as ``mesh``: the
    table is renamed by ``mesh_axes`` (shardlib axis -> the project's axis, a
    tuple of them, or None) and fitted to it by ``rename_mesh_axes``, e.g.
    ``preset_rules("fsdp_tp", mesh=mesh, mesh_axes={"data": "fsdp", "model": "tp"})``.
    Given a mesh, a preset it does not fit is refused as the trainer refuses it
    (``check_mesh_fits_intent``: ``hsdp``/``hsdp_tp`` need both ``data_replica`` and ``data``).
    """
    if name not in PRESETS:
        raise ShardingError(f"unknown sharding preset {name!r}; known presets: {', '.join(PRESETS)}")
    rules = compile_rules(PRESETS[name])
    if mesh is not None:
        check_mesh_fits_intent(name, _shardlib_axis_sizes(_axis_sizes(mesh), mesh_axes or {}))
    if mesh is None and mesh_axes is None:
        return rules
    return rename_mesh_axes(rules, mesh_axes or {}, mesh=mesh, what=f"preset {name!r}")


def rename_mesh_axes(
    rules: Rules,
    mesh_axes: Mapping[str, MeshAxes],
    *,
    mesh: jax.sharding.Mesh | Mapping[str, int] | None = None,
    what: str = "the rules",
) -> Rules:
    """The table with mesh axes renamed, so it serves a mesh with other axis names.

    Args:
      rules: a table naming shardlib's mesh axes (``MESH_AXES``).
      mesh_axes: shardlib axis -> the project's mesh axis, a tuple of them
        (the dimension is split over all, in order), or None (never split
        over it). Axes not in the mapping keep their names.
      mesh: when given, the result must fit it: a renamed axis the mesh lacks
        is an error, and so is ``data`` or ``model`` left unmapped on a mesh
        without them (every parameter would be replicated without a word);
        ``pipe``, ``expert`` and ``seq`` are dropped where the mesh lacks
        them, as if they had size 1.
      what: names the table in error messages.
    Raises:
      ShardingError: a mapping from an axis shardlib does not have, or an axis
        the mesh lacks, naming both and the mesh's axes.
    """
    for axis, target in mesh_axes.items():
        if axis not in MESH_AXES:
            close = difflib.get_close_matches(str(axis), MESH_AXES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ShardingError(
                f"mesh_axes maps {axis!r}, which is not a shardlib mesh axis{hint}; "
                f"keys are shardlib's axes ({', '.join(MESH_AXES)}), values the project's"
            )
        if not (target is None or isinstance(target, str) or all(isinstance(a, str) for a in target)):
            raise ShardingError(f"mesh_axes[{axis!r}] is {target!r}; expected a mesh axis name, a tuple, or None")
    available = None if mesh is None else tuple(_axis_sizes(mesh))
    renamed: list[Rule] = []
    for logical, axes in rules:
        new_axes: list[str] = []
        for axis in axes_tuple(axes):
            if axis in mesh_axes:
                new_axes += axes_tuple(mesh_axes[axis])
            elif available is None or axis in available:
                new_axes.append(axis)
            elif axis not in OPTIONAL_MESH_AXES:
                raise ShardingError(
                    f"{what} splits {logical!r} over mesh axis {axis!r}, which the mesh "
                    f"({', '.join(available)}) lacks; pass mesh_axes={{{axis!r}: <your axis or None>}}"
                )
        if available is not None:
            for axis in new_axes:
                if axis not in available:
                    raise ShardingError(
                        f"{what}: mesh_axes sends {logical!r} to mesh axis {axis!r}, which the mesh "
                        f"({', '.join(available)}) lacks"
                    )
        renamed.append((logical, _axes_or_none(tuple(dict.fromkeys(new_axes)))))
    return tuple(renamed)


def format_rules(rules: Rules) -> str:
    """The table as aligned text, one rule per line, in match order."""
    width = max((len(name) for name, _ in rules), default=0)
    lines = []
    for name, axes in rules:
        shown = "replicated" if axes is None else (axes if isinstance(axes, str) else " x ".join(axes))
        lines.append(f"{name:<{width}}  ->  {shown}")
    return "\n".join(lines)


def axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    """A rule's or a PartitionSpec entry's mesh axes as a tuple: ``None`` -> (), ``"data"`` -> ("data",)."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_axes(spec: PartitionSpec | Sequence[Any]) -> tuple[str, ...]:
    """Every mesh axis a PartitionSpec names, in order of appearance (each once)."""
    return tuple(dict.fromkeys(axis for entry in spec for axis in axes_tuple(entry)))


def rule_axes(rules: Rules, logical: str) -> tuple[str, ...]:
    """The mesh axes the first rule for ``logical`` names (() if none does, or it replicates)."""
    for name, axes in rules:
        if name == logical:
            return axes_tuple(axes)
    return ()


def without_axes(rules: Rules, axes: Sequence[str]) -> Rules:
    """The table with ``axes`` taken out of every rule (a rule left with none replicates).

    What activations inside a ``shard_map`` that makes ``axes`` manual are constrained by.
    """
    return tuple((name, _axes_or_none(tuple(a for a in axes_tuple(m) if a not in axes))) for name, m in rules)


def _axis_sizes(mesh: jax.sharding.Mesh | Mapping[str, int]) -> Mapping[str, int]:
    return dict(mesh.shape) if isinstance(mesh, jax.sharding.Mesh) else mesh


def validate_rules(rules: Rules, mesh: jax.sharding.Mesh | Mapping[str, int] | None = None) -> None:
    """Checks the table's form, and that every mesh axis it names exists."""
    known_axes = tuple(_axis_sizes(mesh)) if mesh is not None else MESH_AXES
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ShardingError(f"rule {i} is {rule!r}; a rule is a (logical name, mesh axes) pair")
        axes = rule[1]
        if not (
            axes is None
            or isinstance(axes, str)
            or (isinstance(axes, tuple | list) and all(isinstance(a, str) for a in axes))
        ):
            raise ShardingError(
                f"rule {i} ({rule[0]!r}) maps to {axes!r}; expected a mesh axis name, a tuple of them, or None"
            )
        if len(set(axes_tuple(axes))) != len(axes_tuple(axes)):
            raise ShardingError(f"rule {i} ({rule[0]!r}) names a mesh axis twice: {axes!r}")
        for axis in axes_tuple(axes):
            if axis not in known_axes:
                raise ShardingError(
                    f"rule {i} ({rule[0]!r}) names mesh axis {axis!r}; the mesh has {', '.join(known_axes)}"
                )


def logical_to_spec(
    logical_axes: LogicalAxes,
    rules: Rules,
    mesh: jax.sharding.Mesh | Mapping[str, int],
    *,
    shape: Sequence[int] | None = None,
    path: str = "<array>",
) -> PartitionSpec:
    """Resolves one tensor's logical axes to a ``PartitionSpec``.

    Args:
      logical_axes: one logical name (or None) per dimension.
      rules: the ordered rule table.
      mesh: a mesh, or its axis sizes.
      shape: the tensor's shape; when given, divisibility is checked.
      path: the tensor's name, used in error messages.
    Raises:
      ShardingError: unknown logical name, a dimension that does not divide,
        or two dimensions left with the same mesh axis.
    """
    sizes = _axis_sizes(mesh)
    validate_rules(rules, sizes)  # a handful of rules, checked at trace time only
    if shape is not None and len(shape) != len(logical_axes):
        raise ShardingError(
            f"{path}: shape {tuple(shape)} has {len(shape)} dimensions but logical axes "
            f"{tuple(logical_axes)} name {len(logical_axes)}"
        )
    known = {name for name, _ in rules}
    used: dict[str, int] = {}  # mesh axis -> dimension that took it
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ShardingError(
                f"{path}: logical axis {name!r} (dimension {dim}) has no rule.{hint} "
                f"Known logical axes: {', '.join(sorted(known))}"
            )
        chosen: tuple[str, ...] | None = None
        clashes: list[str] = []
        for rule_name, rule_axes in rules:
            if rule_name != name:
                continue
            axes = axes_tuple(rule_axes)
            free = tuple(a for a in axes if a not in used)
            clashes += [a for a in axes if a in used]
            if axes and not free:
                continue  # every axis of this rule is taken: try the next rule
            chosen = free
            break
        if chosen is None:
            axis = clashes[0]
            other = used[axis]
            raise ShardingError(
                f"{path}: dimensions {other} ({logical_axes[other]!r}) and {dim} ({name!r}) "
                f"both resolve to mesh axis {axis!r}; add a fallback rule such as "
                f"({name!r}, None) after ({name!r}, {axis!r})"
            )
        # Size-1 axes are dropped, so they never count as taken.
        effective = tuple(a for a in chosen if sizes[a] > 1)
        for axis in effective:
            used[axis] = dim
        if shape is not None and effective:
            parts = math.prod(sizes[a] for a in effective)
            if shape[dim] % parts:
                where = " x ".join(f"{a}={sizes[a]}" for a in effective)
                raise ShardingError(
                    f"{path}: dimension {dim} ({name!r}) of shape {tuple(shape)} has size "
                    f"{shape[dim]}, which does not divide by mesh axes {where} ({parts} parts)"
                )
        spec.append(_axes_or_none(effective))
    return PartitionSpec(*spec)


def logical_to_sharding(
    logical_axes: LogicalAxes,
    rules: Rules,
    mesh: jax.sharding.Mesh,
    *,
    shape: Sequence[int] | None = None,
    path: str = "<array>",
) -> NamedSharding:
    """``logical_to_spec`` bound to a concrete mesh."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape=shape, path=path))
