"""Which mesh axes a collective runs over, from its replica groups or source-target pairs.

XLA prints device groups in four syntaxes, all handled here by expanding them
to explicit lists of device ids:

* explicit:   ``replica_groups={{0,1},{2,3}}`` (``{}``: all devices);
* iota:       ``replica_groups=[4,2]<=[8]`` or ``[2,4]<=[4,2]T(1,0)``: the ids
  ``arange(8).reshape(4, 2).transpose(1, 0)``, one group per row;
* mesh axes:  ``replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}``, optionally
  with ``, device_ids=([2,4]T(1,0))`` and sub-axes ``'axis_0':(1)2``. The
  ``axis_k`` names are XLA's own factorisation of the device ids, *not* the
  JAX mesh's axis names (checked on jax 0.10.2: a data=4 x model=2 mesh prints
  ``mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_2'}`` for a ``model``
  collective), so they are never read as ours;
* pairs:      ``source_target_pairs={{0,1},{1,2}}`` for collective-permute.

Device ids in an SPMD program are positions in the executable's device
assignment, which for a jit over a ``NamedSharding`` is the mesh's flattened
device order; so id ``i`` sits at ``np.unravel_index(i, mesh_shape)``. A group
then names the mesh axes along which its members' coordinates differ.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from shardlib.analysis.report.hlo import Instruction, split_top_level

Groups = list[list[int]]

_IOTA = re.compile(r"^\[([\d,\s]*)\]<=\[([\d,\s]*)\](?:T\(([\d,\s]*)\))?")
_MESH = re.compile(r"^mesh\[([^\]]*)\](?:,\s*device_ids=\((.*?)\))?\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'?([\w.\-]+)'?\s*=\s*(\d+)")
_AXIS_REF = re.compile(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?")


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _iota_ids(reshape: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    return ids.transpose(perm) if perm else ids


def parse_explicit(text: str) -> Groups:
    """``{{0,1},{2,3}}`` -> [[0, 1], [2, 3]]; ``{}`` -> []."""
    inner = text.strip()[1:-1].strip()
    if not inner:
        return []
    return [_ints(group) for group in split_top_level(inner)]


def parse_iota(text: str) -> Groups:
    """``[G,S]<=[dims]T(perm)`` -> G groups of S ids."""
    match = _IOTA.match(text.strip())
    if not match:
        raise ValueError(f"not an iota replica group list: {text!r}")
    shape = _ints(match.group(1))
    ids = _iota_ids(_ints(match.group(2)), _ints(match.group(3)) if match.group(3) else None)
    return ids.reshape(shape[0], -1).tolist()


def _mesh_device_array(sizes: list[int], device_ids: str | None) -> np.ndarray:
    total = math.prod(sizes)
    if not device_ids:
        return np.arange(total).reshape(sizes)
    iota = re.match(r"^\[([\d,\s]*)\](?:T\(([\d,\s]*)\))?$", device_ids.strip())
    if iota:
        ids = _iota_ids(_ints(iota.group(1)), _ints(iota.group(2)) if iota.group(2) else None)
    else:  # an explicit permutation of ids
        ids = np.asarray(_ints(device_ids))
    return ids.reshape(sizes)


def parse_mesh_axes(text: str) -> Groups:
    """``mesh['a'=2,'b'=4] {'b'}`` (see the module docstring) -> explicit groups."""
    match = _MESH.match(text.strip())
    if not match:
        raise ValueError(f"not a mesh-axes replica group list: {text!r}")
    axes = [(name, int(size)) for name, size in _MESH_AXIS.findall(match.group(1))]
    names = [name for name, _ in axes]
    sizes = [size for _, size in axes]
    devices = _mesh_device_array(sizes, match.group(2))
    refs = []
    for ref in split_top_level(match.group(3)):
        m = _AXIS_REF.fullmatch(ref.strip())
        if not m:
            raise ValueError(f"unreadable mesh axis reference {ref!r} in {text!r}")
        index = names.index(m.group(1))
        sub = (int(m.group(2)), int(m.group(3))) if m.group(2) else None
        refs.append((index, sub))
    # Split each axis into the sub-axes its references name (sorted by pre-size,
    # with padding dims between), then move the grouped dims last, in reference order.
    dims: list[int] = []
    ref_dim: dict[int, int] = {}
    for axis, size in enumerate(sizes):
        mine = sorted((r for r in range(len(refs)) if refs[r][0] == axis), key=lambda r: (refs[r][1] or (1, size))[0])
        if not mine:
            dims.append(size)
            continue
        prefix = 1
        for r in mine:
            pre, sub = refs[r][1] or (1, size)
            if pre != prefix:
                dims.append(pre // prefix)
                prefix = pre
            ref_dim[r] = len(dims)
            dims.append(sub)
            prefix *= sub
        if prefix != size:
            dims.append(size // prefix)
    grouped = [ref_dim[r] for r in range(len(refs))]
    order = [d for d in range(len(dims)) if d not in grouped] + grouped
    group_size = math.prod(dims[d] for d in grouped)
    return devices.reshape(dims).transpose(order).reshape(-1, group_size).tolist()


def parse_replica_groups(text: str) -> Groups:
    """Any of the replica-group syntaxes -> explicit groups ([] means one group of all devices)."""
    text = text.strip()
    if text.startswith("{"):
        return parse_explicit(text)
    if text.startswith("["):
        return parse_iota(text)
    if text.startswith("mesh"):
        return parse_mesh_axes(text)
    if text.startswith("maximal_mesh"):
        return [[_ints(text)[0]]]
    raise ValueError(f"unknown replica group syntax: {text!r}")


def instruction_groups(inst: Instruction, num_devices: int) -> Groups:
    """The device groups of a collective instruction (pairs for collective-permute)."""
    pairs = inst.attr("source_target_pairs")
    if pairs is not None:
        return parse_explicit(pairs)
    text = _replica_group_text(inst.attrs)
    groups = parse_replica_groups(text) if text is not None else []
    all_devices = [list(range(num_devices))]
    if not groups:
        return all_devices
    # Cross-replica-and-partition mode (a channel id without global device ids) names
    # replicas; an SPMD program has one replica, so its group spans every partition.
    if "use_global_device_ids=true" not in inst.attrs and max(max(g) for g in groups if g) == 0:
        return all_devices
    return groups


def _replica_group_text(attrs: str) -> str | None:
    """The replica_groups value; the mesh syntax contains ``, device_ids=`` and a space, so split by hand."""
    start = attrs.find("replica_groups=")
    if start < 0:
        return None
    value = attrs[start + len("replica_groups=") :]
    if value.startswith("mesh"):
        match = _MESH.match(value)
        return match.group(0) if match else value.split(", ")[0]
    return split_top_level(value)[0] if value else None


def group_axes(groups: Groups, mesh_shape: Mapping[str, int], *, pairs: bool = False) -> tuple[tuple[str, ...], bool]:
    """(mesh axes the groups span, exact) for groups of flat device positions.

    ``exact`` is False when a group covers only part of its axes (e.g. 2 of the
    4 devices along ``data``), which the report flags. For pairs, the axes are
    those along which any source and target differ.
    """
    names = list(mesh_shape)
    shape = tuple(mesh_shape.values())
    varying: set[int] = set()
    exact = True
    for group in groups:
        if len(group) < 2:
            continue
        coords = np.array(np.unravel_index(np.asarray(group), shape)).T
        differs = {i for i in range(len(names)) if len(set(coords[:, i])) > 1}
        varying |= differs
        if not pairs and len(set(group)) != math.prod(shape[i] for i in differs):
            exact = False
    axes = tuple(names[i] for i in sorted(varying))
    return axes, exact


def group_size(groups: Groups) -> int:
    """Devices per group (the largest, if they differ)."""
    return max((len(g) for g in groups), default=1)


def describe_axes(axes: Sequence[str], exact: bool = True) -> str:
    """``("data", "model")`` -> ``"data+model"``; ``()`` -> ``"none"``; partial groups get a ``~``."""
    label = "+".join(axes) if axes else "none"
    return label if exact else label + "~"
