"""Hardware profiles and the step-time estimate: compute at a stated MFU, communication per axis by link.

A profile is a small YAML file (``shardlib/analysis/report/profiles/h100.yaml``,
``h200.yaml``, or any path: ``--hardware my-cluster.yaml``) giving the dense
peak per dtype, memory, devices per host and two links: inside a host
(NVLink) and across hosts (InfiniBand), each with a bandwidth per device and
direction, an achievable fraction of it and a per-step latency.

Time per collective (alpha-beta model): ``steps * latency + wire_bytes / bandwidth`` with
``steps`` = 2(n-1) for an all-reduce, n-1 for all-gather, reduce-scatter and all-to-all, 1 for a
permute: small messages pay in latency, large ones in bandwidth (the finding of Anthony et al.
2024). The bandwidth of a group inside one host is its NVLink's; a group that crosses hosts runs
as NCCL does, one ring per NIC (rail-aligned): the host's g devices of the group send its bytes
out over g NICs together, so the group moves at ``min(within_host, g x across_hosts)`` per device
(g = 1 for an axis whose groups hold one device per host, as HSDP's ``data_replica``).

An axis crosses hosts if any of its groups does: from the mesh file's ``across_hosts`` when
there is one, else from the layout (``model`` innermost, hosts filled in mesh order). A
collective over several axes is timed as one ring over its whole group, and its time is shown
split over the axes by their byte shares.

Overlap (``Overlap``, the profile's ``overlap:``): each collective class (FSDP gathers,
gradient reductions, a pipeline's reductions around its tick loop, tensor-parallel and sequence
activations, pipeline sends, expert all-to-alls) has an exposed fraction per link: the share
of its time that stays on the critical path (0: hidden as far as the schedule allows; 1: never
hidden; between: what XLA's async collectives and the compute they slow leave). The rest hides
behind the compute the schedule gives it (``hiding_window``): FSDP gathers behind the whole
step (each layer's behind the layer before), reduce-scatters and per-layer gradient
all-reduces behind the backward pass (each behind the backward of earlier layers), a
gradient the step reduces once after accumulating its microbatches (one op over the stacked
layers) behind nothing. The windows nest at the end of the step, and the one comm stream
is serial, so the exposed part is the most by which any window's traffic outlasts its
compute, and at least the last layer's share, which has nothing left to hide behind.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shardlib.analysis.report.terms import Term
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


OVERLAP_CLASSES = (
    "fsdp_gather",
    "gradient_reduction",
    "pipeline_reduction",
    "tensor",
    "sequence",
    "pipeline_send",
    "experts",
)


class Exposed(BaseModel):
    """One collective class's exposed fraction on each link (0 = hidden as far as the schedule allows)."""

    model_config = _STRICT

    within_host: float = Field(ge=0, le=1)
    across_hosts: float = Field(ge=0, le=1)


def _exposed(within: float, across: float | None = None) -> Exposed:
    return Exposed(within_host=within, across_hosts=within if across is None else across)


class Overlap(BaseModel):
    """The exposed fraction of each collective class, per link (a number sets both links).

    The defaults are the shardlib step as XLA runs it on GPUs: the data-parallel and FSDP
    collectives async, behind the compute their window gives them; a pipeline's gathers and
    reductions around its tick loop, and every activation collective (tensor, sequence,
    pipeline, experts), on the critical path. Set one lower where the XLA flags let it hide
    (e.g. collective matmul for ``tensor``), higher where contention slows the compute beside it.
    """

    model_config = _STRICT

    fsdp_gather: Exposed = _exposed(0.0)
    gradient_reduction: Exposed = _exposed(0.0)
    pipeline_reduction: Exposed = _exposed(1.0)
    tensor: Exposed = _exposed(1.0)
    sequence: Exposed = _exposed(1.0)
    pipeline_send: Exposed = _exposed(1.0)
    experts: Exposed = _exposed(1.0)

    @model_validator(mode="before")
    @classmethod
    def _numbers_set_both_links(cls, raw):
        if isinstance(raw, dict):
            return {
                k: {"within_host": v, "across_hosts": v} if isinstance(v, int | float) else v for k, v in raw.items()
            }
        return raw

    def exposed(self, overlap_class: str, across_hosts: bool) -> float:
        fraction = getattr(self, overlap_class)
        return fraction.across_hosts if across_hosts else fraction.within_host


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
    overlap: Overlap = Overlap()

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
class TermTime:
    """One predicted term on a profile: its seconds, link, class and how much of it hides."""

    term: Term
    seconds: float
    link: str
    overlap_class: str
    window: str  # the compute it may hide behind: "step", "backward" or "none"
    exposed_fraction: float  # of ``seconds``, on the critical path whatever the window

    def as_dict(self) -> dict:
        return self.term.as_dict() | {
            "seconds": self.seconds,
            "link": self.link,
            "overlap_class": self.overlap_class,
            "window": self.window,
            "exposed_fraction": self.exposed_fraction,
        }


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
    bubble: float = 0.0
    terms: tuple[TermTime, ...] = ()

    @property
    def comm_s(self) -> float:
        return sum(self.comm_s_per_axis.values())

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def hidden_s(self) -> float:
        """Communication that runs behind compute."""
        return max(0.0, self.comm_s - self.exposed_s)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self) | {"comm_s": self.comm_s, "step_s": self.step_s, "hidden_s": self.hidden_s}
        out["terms"] = [t.as_dict() for t in self.terms]
        return out


def overlap_class(term: Term) -> str:
    """Which of ``OVERLAP_CLASSES`` a term belongs to (its strategy and what it carries)."""
    if term.strategy == "pipeline" and term.kind != "collective-permute":
        return "pipeline_reduction"  # the outer parameters' gradients, after the tick loop
    if term.strategy in ("data parallel", "fsdp") and not term.overlappable and term.kind != "all-to-all":
        return "pipeline_reduction"  # param_traffic.gradient_terms: a pipeline gathers and reduces around its loop
    if term.strategy == "fsdp" and term.kind in ("all-gather", "all-to-all"):
        return "fsdp_gather"
    if term.strategy in ("fsdp", "data parallel", "diloco"):
        return "gradient_reduction"
    return {"tensor parallel": "tensor", "sequence": "sequence", "pipeline": "pipeline_send"}.get(
        term.strategy, "experts"
    )


def hiding_window(term: Term) -> str:
    """The compute ``term`` can run behind: "step" (forward and backward), "backward", or "none".

    FSDP's gathers (and the lookup's id gather) run ahead of the layer that needs them;
    reduce-scatters and per-layer all-reduces follow each layer's backward. A layers' gradient
    all-reduced once per step (``count`` 1: one op over the stacked layers, after the last
    microbatch) and a pipeline's collectives around its tick loop have no compute beside them.
    DiLoCo's outer all-reduce hides behind the next inner step when it overlaps.
    """
    cls = overlap_class(term)
    if cls == "pipeline_reduction":
        return "step"  # hidden only where the profile says the schedule overlaps it (default: exposed)
    if term.strategy == "diloco":
        return "step" if term.overlappable else "none"
    if cls == "fsdp_gather":
        return "step" if term.overlappable else "none"
    if cls == "gradient_reduction":
        once = term.count == 1 and "(layer)" in term.what
        return "none" if once else "backward"
    return "step"  # activation collectives: hidden only as far as their exposed fraction says


_BACKWARD_SHARE = 2 / 3  # of a step's compute: the backward pass's two matmuls per forward one


def group_inside_host(axes, sizes: Mapping[str, int], devices_per_host: int, across=None) -> int:
    """Devices of one group over ``axes`` inside one host (hosts filled from ``model`` outwards, or
    the mesh file's ``across_hosts``)."""
    inside, inner = 1, 1
    for axis in reversed(list(sizes)):
        size = sizes[axis]
        if across is not None and any(v > 1 for v in across.values()):
            part = size // max(1, across.get(axis, 1))
        else:
            part = math.gcd(size, max(1, devices_per_host // inner))
        if axis in axes:
            inside *= max(1, part)
        inner *= max(1, part)
    return inside


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
    which stretches the compute time to ``flops`` over (1 - bubble). Communication hides as the
    module docstring says; the exposed part adds to the compute time.
    """
    mfu = mfu or profile.mfu
    work = flops / (profile.peak_flops(dtype) * mfu)
    compute = work / (1 - bubble)
    slow = axes_across_hosts(sizes, profile.devices_per_host, across)
    links = {a: profile.links.across_hosts if a in slow else profile.links.within_host for a in sizes}
    per_axis: dict[str, float] = defaultdict(float)
    critical = 0.0
    hiding = dict.fromkeys(("none", "backward", "step"), 0.0)
    timed = []
    for term in terms:
        shares = term.per_axis(sizes)
        if not shares:
            continue
        seconds, link, crosses = _term_seconds(term, shares, sizes, links, slow, profile, across)
        for axis, wire in shares.items():
            per_axis[axis] += seconds * wire / term.wire_bytes
        cls, window = overlap_class(term), hiding_window(term)
        exposed = profile.overlap.exposed(cls, crosses)
        if window == "none":
            exposed = 1.0
        critical += exposed * seconds
        hiding[window] += (1 - exposed) * seconds
        timed.append(TermTime(term, seconds, link.name, cls, window, exposed))
    overlappable = hiding["backward"] + hiding["step"]
    # The windows nest at the end of the step (backward within the step) and the comm stream is
    # serial: what outlasts a window's compute is exposed, and the last layer's share always is.
    # Only the work hides traffic, not a pipeline's idle ticks (the stages idle at different times).
    behind_backward = max(0.0, hiding["backward"] - _BACKWARD_SHARE * work)
    behind_step = max(0.0, overlappable - work)
    exposed_overlap = max(behind_backward, behind_step, overlappable / max(n_layers, 1)) if overlappable else 0.0
    return TimeEstimate(
        profile=profile.name,
        mfu=mfu,
        compute_s=compute,
        comm_s_per_axis=dict(per_axis),
        link_per_axis={a: links[a].name for a in per_axis},
        exposed_s=critical + exposed_overlap,
        overlappable_s=overlappable,
        critical_s=critical,
        bubble=bubble,
        terms=tuple(timed),
    )


def _term_seconds(term, shares, sizes, links, slow, profile, across) -> tuple[float, Link, bool]:
    """(seconds, slowest link, crosses hosts) of one term: latency per ring step at the slowest
    link's, bytes at the group's bandwidth (a group crossing hosts: ``min(NVLink, g x NIC)``)."""
    slowest = min((links[a] for a in shares), key=lambda link: link.bytes_per_s)
    crosses = any(a in slow for a in shares)
    bandwidth = slowest.bytes_per_s
    if crosses:
        g = group_inside_host(term.axes, sizes, profile.devices_per_host, across)
        bandwidth = min(profile.links.within_host.bytes_per_s, g * profile.links.across_hosts.bytes_per_s)
    latency = term.count * _steps(term.kind, term.group) * slowest.latency_us * 1e-6
    return term.wire_bytes / bandwidth + latency, slowest, crosses


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us" if s > 0 and not math.isclose(s, 0) else "0"
