"""Device meshes described by small YAML files.

Every mesh has the same named axes, in a fixed order (``MESH_AXES``), so sharding rules
elsewhere can name any axis without checking whether the mesh has it; unused axes have size 1.
``model`` is innermost so tensor-parallel peers land on adjacent (best-connected) devices.

The five parallel axes are ``data``, ``pipe``, ``expert``, ``seq`` and ``model``. A sixth,
``data_replica``, is the outer part of data parallelism when a mesh splits it in two (hybrid
sharded data parallelism, HSDP): the batch is split over ``data_replica x data``, but parameters
and optimizer state are never split over ``data_replica``, so FSDP shards them inside one replica
group (over ``data``) and the groups hold copies. Rules and presets say ``data`` for both parts;
only the batch rule names ``data_replica`` (``shardlib.core.rules``). It is outermost, so on
several hosts it is the axis that crosses the slow links: one all-reduce of each gradient shard
per step, while the gathers and reduce-scatters of FSDP stay inside a host::

    within_host: {data: 8}             # FSDP over the 8 GPUs of a host
    across_hosts: {data_replica: 4}    # 4 hosts, each with a full copy of the parameters

A mesh file splits each axis into a size inside one host (ICI/NVLink) and a size across hosts
(DCN/InfiniBand)::

    description: 8 emulated CPU devices, data 4 x model 2
    platform: cpu                      # optional: cpu | gpu | tpu; absent = JAX's default backend
    emulate_cpu_devices: 8             # optional: CPU devices to emulate per process
    within_host: {data: 4, model: 2}   # absent axes are 1; at most one -1 (absorbs the rest)
    across_hosts: {data: 1}            # optional; absent axes are 1; at most one -1

The total size of an axis is ``within_host[axis] * across_hosts[axis]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax._src import xla_bridge  # private, but the only way to ask "too late?" without an init
from jax.experimental import mesh_utils

from shardlib.core.yaml_file import read_yaml

MESH_AXES: tuple[str, ...] = ("data_replica", "data", "pipe", "expert", "seq", "model")
"""Every mesh's axes, outermost first: ``model`` innermost, so tensor-parallel peers are neighbours."""
PLATFORMS: tuple[str, ...] = ("cpu", "gpu", "tpu")
_FILE_KEYS: tuple[str, ...] = (
    "description",
    "platform",
    "emulate_cpu_devices",
    "within_host",
    "across_hosts",
)
_LEVELS: tuple[str, ...] = ("within_host", "across_hosts")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A validated mesh description; turn it into a ``jax.sharding.Mesh`` with ``build_mesh``.

    ``within_host`` and ``across_hosts`` always hold all of ``MESH_AXES`` in order (missing
    axes are filled in with 1 on construction); each may hold one -1, resolved by ``build_mesh``
    against the devices actually present.
    """

    within_host: dict[str, int]
    across_hosts: dict[str, int]
    platform: str | None = None
    emulate_cpu_devices: int | None = None
    name: str = "<inline>"
    description: str = ""

    def __post_init__(self) -> None:
        where = f"mesh {self.name!r}"
        # Normalise here rather than only in the parsers, so specs built directly are just as
        # safe for build_mesh (which relies on every axis being present, in order).
        for level in _LEVELS:
            object.__setattr__(self, level, _check_sizes(getattr(self, level), level, where))
        _check_platform(self.platform, where)
        _check_emulate(self.emulate_cpu_devices, where)


def mesh_spec_from_dict(d: Mapping[str, Any], name: str = "<inline>") -> MeshSpec:
    """Validate a parsed mesh file (or an equivalent dict) and return its ``MeshSpec``.

    Raises ``ValueError`` naming ``name`` and the offending key or value.
    """
    return _parse(d, name, where=f"mesh {name!r}")


def load_mesh_spec(path: str | Path) -> MeshSpec:
    """Read a mesh YAML file into a ``MeshSpec`` named after the file stem (``cpu-8``).

    Raises ``ValueError`` naming the path when the file is missing, is not valid YAML, or
    describes an invalid mesh.
    """
    path = Path(path)
    data = read_yaml(path, "mesh file")
    return _parse(data, path.stem, where=f"mesh file {str(path)!r}")


def mesh_spec(**sizes: int) -> MeshSpec:
    """Single-host spec from axis sizes, e.g. ``mesh_spec(data=4, model=2)``; other axes are 1."""
    return MeshSpec(within_host=sizes, across_hosts={})


def prepare_devices(spec: MeshSpec) -> None:
    """Ask JAX to emulate ``spec.emulate_cpu_devices`` CPU devices, if it still can.

    JAX fixes the CPU device count when its backends start, so this must run before the first
    device use. Once they have started it does nothing, and ``build_mesh`` reports any resulting
    shortage of devices. Only the CPU backend is affected, so it is harmless on GPU/TPU hosts.
    """
    if spec.emulate_cpu_devices is None:
        return
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", spec.emulate_cpu_devices)


def build_mesh(
    spec: MeshSpec, devices: Sequence[jax.Device] | None = None, *, explicit: bool = False
) -> jax.sharding.Mesh:
    """Build the mesh of ``MESH_AXES`` described by ``spec``: all axes ``AxisType.Auto``, or ``Explicit``.

    ``devices`` defaults to every device of ``spec.platform`` (or of JAX's default backend);
    pass a subset (``jax.devices()[:1]`` with ``mesh_spec()`` is a one-device reference) and
    the spec must fit it exactly. ``explicit=True`` builds ``AxisType.Explicit`` axes, for
    models written for explicit sharding (``out_sharding=`` on their ops, run under
    ``jax.set_mesh(mesh)``); shardlib's own training runs on Auto axes.

    Axes with ``across_hosts`` sizes above 1 span processes: each process is one host, and the
    devices are laid out with ``mesh_utils.create_hybrid_device_mesh`` so that only those axes
    cross the slow links. Raises ``ValueError`` when the sizes do not fit the devices.
    """
    where = f"mesh {spec.name!r}"
    devices = _default_devices(spec, where) if devices is None else list(devices)
    if not devices:
        raise ValueError(f"{where}: no devices given")
    kind = _device_kind(devices)
    if spec.platform is not None and kind != spec.platform:
        raise ValueError(f"{where} is for platform {spec.platform!r} but got {kind} devices")

    per_process = Counter(d.process_index for d in devices)
    n_processes = len(per_process)
    across = spec.across_hosts
    if -1 in across.values():
        across = _resolve(across, n_processes, "process", f"{where} (across_hosts)")
    n_hosts = math.prod(across.values())
    axis_type = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    axis_types = (axis_type,) * len(MESH_AXES)

    if n_hosts == 1:
        # One host, or a flat mesh over every process's devices: within_host covers them all.
        within = _resolve(spec.within_host, len(devices), f"{kind} device", where)
        return jax.make_mesh(tuple(within.values()), MESH_AXES, axis_types=axis_types, devices=devices)

    if n_hosts != n_processes:
        raise ValueError(
            f"{where} needs {n_hosts} processes (across_hosts {format_sizes(across)}) but the "
            f"{_count(len(devices), kind + ' device')} belong to {_count(n_processes, 'process')}; "
            "start one process per host and call jax.distributed.initialize() first"
        )
    if len(set(per_process.values())) != 1:
        raise ValueError(
            f"{where}: processes hold different numbers of devices "
            f"({dict(sorted(per_process.items()))}), so no host layout fits"
        )
    within = _resolve(spec.within_host, len(devices) // n_hosts, f"{kind} device", where, per_host=True)
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(within.values()), tuple(across.values()), devices, process_is_granule=True
    )
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_axis_sizes(mesh: jax.sharding.Mesh) -> dict[str, int]:
    """Axis sizes of ``mesh`` in axis order, e.g. ``{"data": 4, "pipe": 1, ..., "model": 2}``."""
    return {str(name): int(size) for name, size in mesh.shape.items()}


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    """One line for logs, e.g. ``"data=4 x model=2 (8 cpu devices; pipe, expert, seq = 1)"``."""
    sizes = mesh_axis_sizes(mesh)
    devices = list(np.asarray(mesh.devices).flat)
    where = _count(len(devices), f"{_device_kind(devices)} device")
    n_processes = len({d.process_index for d in devices})
    if n_processes > 1:
        where += f" in {n_processes} processes"
    # data_replica is a part of data, not a strategy: a flat mesh need not say it lacks one.
    trivial = [name for name, size in sizes.items() if size == 1 and name != "data_replica"]
    if all(size == 1 for size in sizes.values()):
        return f"single device ({where}; all axes = 1)"
    if trivial:
        where += f"; {', '.join(trivial)} = 1"
    return f"{format_sizes(sizes)} ({where})"


# --- parsing and validation -----------------------------------------------------------------


def _parse(d: Any, name: str, where: str) -> MeshSpec:
    if not isinstance(d, Mapping):
        # ValueError, not TypeError, for every bad file content: callers catch one exception.
        keys = ", ".join(_FILE_KEYS)
        raise ValueError(f"{where}: expected a mapping of {keys}, got {d!r}")  # noqa: TRY004
    for key in d:
        if key not in _FILE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}{_suggest(key, _FILE_KEYS)}")
    if "within_host" not in d:
        raise ValueError(f"{where}: missing 'within_host' (axis sizes inside one host)")
    description = d.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        message = f"{where}: description must be a string, got {description!r}"
        raise ValueError(message)  # noqa: TRY004
    # Everything is checked here although MeshSpec checks it again, so that a message about
    # a file names the file, not just its stem.
    levels = {level: _check_sizes(d.get(level), level, where) for level in _LEVELS}
    return MeshSpec(
        **levels,
        platform=_check_platform(d.get("platform"), where),
        emulate_cpu_devices=_check_emulate(d.get("emulate_cpu_devices"), where),
        name=name,
        description=description,
    )


def _check_sizes(sizes: Any, level: str, where: str) -> dict[str, int]:
    """Validate one level's axis sizes and return them with all axes present, in order."""
    if sizes is None:
        sizes = {}
    if not isinstance(sizes, Mapping):
        message = f"{where}: {level} must map axis names to sizes, got {sizes!r}"
        raise ValueError(message)  # noqa: TRY004
    for axis, size in sizes.items():
        if axis not in MESH_AXES:
            raise ValueError(
                f"{where}: unknown axis {axis!r} in {level}; valid axes are "
                f"{', '.join(MESH_AXES)}{_suggest(axis, MESH_AXES)}"
            )
        if not _is_int(size, -1) or size == 0:
            raise ValueError(f"{where}: {level}.{axis} must be a positive integer or -1, got {size!r}")
    absorbing = [axis for axis, size in sizes.items() if size == -1]
    if len(absorbing) > 1:
        raise ValueError(
            f"{where}: {level} has -1 on {', '.join(absorbing)}; at most one axis per level "
            "may absorb the remaining devices"
        )
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def _check_platform(platform: Any, where: str) -> str | None:
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"{where}: platform must be one of {', '.join(PLATFORMS)} or absent, got {platform!r}")
    checked: str | None = platform
    return checked


def _check_emulate(count: Any, where: str) -> int | None:
    if count is not None and not _is_int(count, 1):
        raise ValueError(f"{where}: emulate_cpu_devices must be a positive integer, got {count!r}")
    checked: int | None = count
    return checked


def _resolve(sizes: dict[str, int], available: int, noun: str, where: str, *, per_host: bool = False) -> dict[str, int]:
    """Replace a -1 in ``sizes`` so the product equals ``available`` ``noun``s, or raise.

    ``noun`` is e.g. "cpu device" or "process"; ``per_host`` words the messages for a
    multi-host mesh, where ``available`` counts the devices of one process.
    """
    fixed = math.prod(size for size in sizes.values() if size != -1)
    have = _count(available, noun)
    have = f"each process has {have}" if per_host else f"{have} {_is_are(available)} available"
    scope = " per host" if per_host else ""
    generic = noun.split()[-1]  # "cpu device" -> "device": the spec itself names no platform
    absorbing = [axis for axis, size in sizes.items() if size == -1]
    if absorbing:
        if available % fixed:
            raise ValueError(
                f"{where}: {format_sizes(sizes)} needs a multiple of {fixed} {_plural(generic)}"
                f"{scope} for {absorbing[0]}=-1 to absorb, but {have}"
            )
        return {axis: available // fixed if size == -1 else size for axis, size in sizes.items()}
    if fixed != available:
        raise ValueError(f"{where} needs {_count(fixed, generic)}{scope} ({format_sizes(sizes)}) but {have}")
    return dict(sizes)


def _default_devices(spec: MeshSpec, where: str) -> list[jax.Device]:
    if spec.platform is None:
        return jax.devices()
    try:
        return jax.devices(spec.platform)
    except RuntimeError as err:
        raise ValueError(f"{where} is for platform {spec.platform!r}, which JAX cannot use here: {err}") from err


# --- small helpers --------------------------------------------------------------------------


def _is_int(value: Any, minimum: int) -> bool:
    # bool is an int subclass, but `data: true` in a YAML file is a mistake, not a size of 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _suggest(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_sizes(sizes: Mapping[str, int]) -> str:
    """Axis sizes as people write them: ``data=4 x model=2`` (size-1 axes left out)."""
    shown = [f"{axis}={size}" for axis, size in sizes.items() if size != 1]
    return " x ".join(shown) if shown else "all axes 1"


def _device_kind(devices: Sequence[jax.Device]) -> str:
    return "/".join(sorted({d.platform for d in devices}))


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else _plural(noun)}"


def _is_are(n: int) -> str:
    return "is" if n == 1 else "are"
