"""Hardware profiles and the step-time estimate: compute at a stated MFU, communication per axis by link.

A profile is a small YAML file (``shardlib/analysis/report/profiles/h100.yaml``,
``h200.yaml``, or any path: ``--hardware my-cluster.yaml``) giving the dense
peak per dtype, memory, devices per host and two links: inside a host
(NVLink) and across hosts (InfiniBand), each with a bandwidth per device and
direction, an achievable fraction of it and a per-step latency.

Time per collective (alpha-beta model): ``steps * latency + wire_bytes /
(bandwidth * efficiency)`` with ``steps`` = 2(n-1) for an all-reduce, n-1 for
all-gather, reduce-scatter and all-to-all, 1 for a permute: small messages
pay in latency, large ones in bandwidth (the finding of Anthony et al. 2024).

An axis uses the inter-host link if any of its groups crosses a host:
from the mesh file's ``across_hosts`` when there is one, else from the
layout (``model`` innermost, hosts filled in mesh order). A collective over
several axes is timed as one flat ring over its whole group at the speed of
its slowest link (a hierarchical algorithm would do better; XLA does not
emit one), and its time is shown split over the axes by their byte shares.

Exposed versus overlappable: tensor-parallel and sequence traffic sits on the
critical path (the next matmul needs it); gradient reduction and FSDP gathers
can run behind compute. Exposed = the critical-path time + whatever the
overlappable traffic needs beyond the compute time (at least its last
layer's share, which has nothing left to hide behind).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardlib.analysis.report.analytic import Term
from shardlib.core.yaml_file import read_yaml

PROFILE_DIR = Path(__file__).parent / "profiles"
_STRICT = ConfigDict(extra="forbid")


class Link(BaseModel):
    model_config = _STRICT

    name: str
    bandwidth_gb_s: float = Field(gt=0)  # per device and direction, GB = 1e9 bytes
    efficiency: float = Field(default=1.0, gt=0, le=1)
    latency_us: float = Field(default=0.0, ge=0)

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gb_s * 1e9 * self.efficiency


class Links(BaseModel):
    model_config = _STRICT

    within_host: Link
    across_hosts: Link


class Profile(BaseModel):
    """One accelerator and its interconnect."""

    model_config = _STRICT

    name: str
    description: str = ""
    peak_tflops: dict[str, float]
    memory_gib: float = Field(gt=0)
    usable_fraction: float = Field(default=0.9, gt=0, le=1)
    hbm_tb_s: float | None = None
    devices_per_host: int = Field(gt=0)
    links: Links
    mfu: float = Field(default=0.4, gt=0, le=1)

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * 2**30 * self.usable_fraction

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise ValueError(
                f"hardware profile {self.name!r} has no peak for {dtype}; it lists {sorted(self.peak_tflops)}"
            )
        return self.peak_tflops[dtype] * 1e12


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (``h100``, ``h200``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(
                f"unknown hardware profile {name_or_path!r}; shipped: {', '.join(builtin_profiles())}, or give a YAML path"
            )
    raw = read_yaml(path, "hardware profile")
    try:
        return Profile.model_validate(raw)
    except ValidationError as err:  # one readable error for the CLI, naming the file
        raise ValueError(f"invalid hardware profile {path}: {err}") from None


def axes_across_hosts(
    sizes: Mapping[str, int], devices_per_host: int, across: Mapping[str, int] | None = None
) -> set[str]:
    """Mesh axes whose groups span more than one host."""
    if across is not None and any(v > 1 for v in across.values()):
        return {a for a, v in across.items() if v > 1}
    out, inner = set(), 1
    for axis in reversed(list(sizes)):  # model is innermost: it fills a host first
        size = sizes[axis]
        if size > 1 and inner * size > devices_per_host:
            out.add(axis)
        inner *= size
    return out


def _steps(kind: str, n: int) -> int:
    if kind == "all-reduce":
        return 2 * (n - 1)
    if kind == "collective-permute":
        return 1
    return n - 1


@dataclasses.dataclass(frozen=True)
class TimeEstimate:
    """Seconds per step on a profile."""

    profile: str
    mfu: float
    compute_s: float
    comm_s_per_axis: dict[str, float]
    link_per_axis: dict[str, str]
    exposed_s: float
    overlappable_s: float
    critical_s: float

    @property
    def comm_s(self) -> float:
        return sum(self.comm_s_per_axis.values())

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"comm_s": self.comm_s, "step_s": self.step_s}


def estimate_time(
    terms: list[Term],
    sizes: Mapping[str, int],
    flops: float,
    dtype: str,
    profile: Profile,
    *,
    n_layers: int,
    mfu: float | None = None,
    across: Mapping[str, int] | None = None,
    bubble: float = 0.0,
) -> TimeEstimate:
    """Step time of the predicted ``terms`` plus ``flops`` per device in ``dtype`` on ``profile``.

    ``bubble``: the share of the step a pipeline's stages sit idle (``compute.pipeline_bubble``),
    which stretches the compute time to ``flops`` over (1 - bubble).
    """
    mfu = mfu or profile.mfu
    compute = flops / (profile.peak_flops(dtype) * mfu) / (1 - bubble)
    slow = axes_across_hosts(sizes, profile.devices_per_host, across)
    links = {a: profile.links.across_hosts if a in slow else profile.links.within_host for a in sizes}
    per_axis: dict[str, float] = defaultdict(float)
    critical = overlappable = 0.0
    for term in terms:
        shares = term.per_axis(sizes)
        if not shares:
            continue
        # One collective over several axes runs as one ring (NCCL's default): every
        # step waits for the slowest link in it, so the whole op goes at that speed.
        slowest = min((links[a] for a in shares), key=lambda link: link.bytes_per_s)
        seconds = (
            term.wire_bytes / slowest.bytes_per_s
            + term.count * _steps(term.kind, term.group) * slowest.latency_us * 1e-6
        )
        for axis, wire in shares.items():
            per_axis[axis] += seconds * wire / term.wire_bytes
        if term.overlappable:
            overlappable += seconds
        else:
            critical += seconds
    exposed_overlap = max(overlappable - compute, overlappable / max(n_layers, 1)) if overlappable else 0.0
    return TimeEstimate(
        profile=profile.name,
        mfu=mfu,
        compute_s=compute,
        comm_s_per_axis=dict(per_axis),
        link_per_axis={a: links[a].name for a in per_axis},
        exposed_s=critical + exposed_overlap,
        overlappable_s=overlappable,
        critical_s=critical,
    )


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us" if s > 0 and not math.isclose(s, 0) else "0"
