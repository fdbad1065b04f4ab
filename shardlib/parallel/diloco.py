"""Local SGD and DiLoCo across replica groups: H inner steps without a collective, then one all-reduce.

The algorithm (DiLoCo, Douillard et al. 2023, Algorithm 1), R replica groups,
period length H, anchor θ (the parameters the period started from, the same
on every replica):

1. every replica r starts the period from θ_r = θ and takes H steps of the
   inner optimizer (the run's AdamW) on its own rows of every batch; its inner
   optimizer state is its own and is kept across periods (paper, section 6.1);
2. the pseudo-gradient Δ = mean_r (θ - θ_r): one all-reduce over the replica
   axes, 2(R-1)/R of the parameter bytes per device, once per H steps;
3. the outer optimizer (SGD with Nesterov momentum, lr about 0.7) applies Δ
   to θ, and every replica restarts from the new θ.

Local SGD is the special case with outer SGD at lr 1 and no momentum: θ
becomes the replicas' mean. With H = 1, local SGD and a linear inner optimizer
(plain SGD) is data parallelism.

Layout. Every per-replica array carries a leading replica dimension R, sharded over the
replica axes: parameters ``params_R`` [R, *shape] with spec ``P(replica_axes, *spec)``, the
inner optimizer state likewise; the anchor and the outer optimizer state have the parameters'
own shape and are replicated over the replica axes. The inner step runs the run's ordinary
gradient function under ``jax.vmap(spmd_axis_name=replica_axes)``, so replica r's forward and
backward stay on replica r's devices and the other mesh axes stay the compiler's, through the
same rule table with the replica axes taken out. The only collective over the replica axes is
the mean in ``outer_update``. (Why this layout and not a partial-manual ``shard_map``:
docs/strategies/diloco.md, "Why a leading replica dimension".)

Streaming DiLoCo (fragments synced on staggered steps, and the outer step
overlapped with the next inner step) is ``shardlib.parallel.diloco_streaming``.

Pure functions of arrays and small settings; the jitted steps with their
shardings are built in ``shardlib.training.step``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any
ALGORITHMS = ("diloco", "local_sgd")
MOMENTS = ("none", "first", "both")  # the inner AdamW moments averaged at outer steps (average_moments)
MOMENT_NAMES = {"first": "mu", "both": "mu and nu"}
# reduce(delta_R, error_feedback) -> (mean over replicas, new error feedback): a compressed all-reduce.
Reduce = Callable[[PyTree, dict], tuple[PyTree, dict]]


@dataclasses.dataclass(frozen=True)
class OuterSettings:
    """What the outer loop needs: the algorithm, the period H and the outer SGD's hyper-parameters.

    replica_axes: mesh axes whose shards are the replica groups (R = product of their sizes).
    compression: ``none``, ``bf16`` or ``int8``: how the pseudo-gradient travels.
    """

    algorithm: str
    every: int
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    replica_axes: tuple[str, ...] = ("data",)
    compression: str = "none"
    fragments: int = 1  # streaming DiLoCo's F; 1: every outer step syncs the whole network
    # 1: an outer step's all-reduce runs inside the next inner step's program, beside its compute, and
    # its result lands one inner step late (streaming DiLoCo's tau = 1); 0: between two inner steps.
    overlap: int = 0
    # alpha: where an outer step lands, each replica keeps this share of its own parameters and takes
    # 1 - alpha of the new anchor's (0: it restarts from the anchor, as in DiLoCo).
    mixing: float = 0.0
    # The inner AdamW's moments averaged over the replicas at each outer step (``average_moments``):
    # none, first (mu) or both (mu and nu).
    moments: str = "none"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown outer algorithm {self.algorithm!r}; known: {', '.join(ALGORITHMS)}")
        if self.every < 1:
            raise ValueError(f"outer.inner_steps must be at least 1 (inner steps per outer step), got {self.every}")
        if self.fragments < 1 or self.every % self.fragments:
            raise ValueError(
                f"outer.fragments={self.fragments} must divide outer.inner_steps={self.every}: each fragment's "
                "outer step falls H/F inner steps after the previous fragment's"
            )
        if self.overlap not in (0, 1):
            raise ValueError(
                f"outer.overlap_steps={self.overlap}: 0 or 1 (an all-reduce can only hide behind the inner step "
                "in the same program)"
            )
        if self.moments not in MOMENTS:
            raise ValueError(f"outer.average_moments={self.moments!r}; known: {', '.join(MOMENTS)}")
        if self.moments != "none" and self.overlap:
            raise ValueError(
                "outer.average_moments with outer.overlap_steps=1 is not built: the moments' all-reduce would wait "
                "for the inner step that updates them"
            )
        if not 0.0 <= self.mixing < 1.0:
            raise ValueError(f"outer.mixing={self.mixing} must be in [0, 1): the replicas' own share")

    def due(self, step: int) -> bool:
        """Whether an outer step follows inner step ``step`` (counted from 1): after every H/F-th."""
        return step % (self.every // self.fragments) == 0

    def fragment_due(self, step: int) -> int:
        """Which fragment's outer step follows inner step ``step`` (``due``): 0, 1, ..., F-1 in turn, so
        fragment f syncs after steps (f + 1) H/F + k H (F = 1: fragment 0 after every H-th)."""
        return (step // (self.every // self.fragments) - 1) % self.fragments

    def describe(self) -> str:
        if self.algorithm == "local_sgd":
            outer = "parameter averaging (outer SGD lr 1)"
        else:
            kind = "Nesterov" if self.nesterov and self.momentum else "heavy-ball" if self.momentum else "no"
            outer = f"outer SGD lr {self.lr:g}, {kind} momentum {self.momentum:g}"
        streaming = f" (streaming: {self.fragments} fragments, one every {self.every // self.fragments})"
        streaming = streaming if self.fragments > 1 else ""
        late = ", each all-reduce beside the next inner step" if self.overlap else ""
        late += f", replicas keep {self.mixing:g} of their own" if self.mixing else ""
        late += {"none": "", "first": ", AdamW's mu averaged", "both": ", AdamW's mu and nu averaged"}[self.moments]
        over = ", ".join(self.replica_axes)
        return f"{self.algorithm} every {self.every} steps{streaming} over {over}: {outer}{late}"


def take_rows(x: jax.Array, rows: tuple[int, int], lead: int) -> jax.Array:
    """``x``'s rows [start, stop) of dimension ``lead`` (the layers); a leaf with no such dimension whole."""
    return x if x.ndim <= lead else lax.slice_in_dim(x, rows[0], rows[1], axis=lead)


def outer_optimizer(settings: OuterSettings) -> optax.GradientTransformation:
    """The outer SGD: Nesterov momentum for DiLoCo, plain SGD at lr 1 for local SGD (averaging)."""
    if settings.algorithm == "local_sgd":
        return optax.sgd(1.0)
    momentum = settings.momentum or None
    return optax.sgd(settings.lr, momentum=momentum, nesterov=bool(momentum) and settings.nesterov)


def _lead(replica_axes: Sequence[str]) -> str | tuple[str, ...]:
    return replica_axes[0] if len(replica_axes) == 1 else tuple(replica_axes)


def replica_count(mesh: jax.sharding.Mesh, replica_axes: Sequence[str]) -> int:
    """R: the number of replica groups, the product of the replica axes' sizes."""
    return math.prod(mesh.shape[a] for a in replica_axes)


def per_replica(sharding: NamedSharding, replica_axes: Sequence[str]) -> NamedSharding:
    """The sharding of [R, *shape] given that of [*shape]: R over the replica axes, the rest as before."""
    return NamedSharding(sharding.mesh, PartitionSpec(_lead(replica_axes), *sharding.spec))


def split_replicas(
    x_BxL: jax.Array, batch_axes: Sequence[str], replica_axes: Sequence[str], mesh: jax.sharding.Mesh
) -> jax.Array:
    """[B, L] -> [R, B/R, L]: replica r gets the rows its own devices hold, so no data moves.

    ``batch_axes``: the mesh axes the batch is split over, in the batch
    spec's order (its rows are blocks in that axes' row-major order); the
    replica axes are among them. Row blocks are reordered replica axes first,
    then the others; the result's leading dimension is sharded over the
    replica axes and its second over the remaining batch axes.
    """
    sizes = [mesh.shape[a] for a in batch_axes]
    b, length = x_BxL.shape
    block = b // math.prod(sizes)
    x = x_BxL.reshape(*sizes, block, length)
    inner = [i for i, a in enumerate(batch_axes) if a not in replica_axes]
    order = [batch_axes.index(a) for a in replica_axes] + inner
    x = x.transpose(*order, len(sizes), len(sizes) + 1)
    r = math.prod(mesh.shape[a] for a in replica_axes)
    x_RxBxL = x.reshape(r, b // r, length)
    rest = tuple(batch_axes[i] for i in inner)
    spec = PartitionSpec(_lead(replica_axes), _lead(rest) if rest else None, None)
    return lax.with_sharding_constraint(x_RxBxL, NamedSharding(mesh, spec))


def replicate(tree: PyTree, replicas: int) -> PyTree:
    """Every leaf [*shape] -> [R, *shape], R identical copies (a broadcast: each device keeps its own)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (replicas, *x.shape)), tree)


def replica_mean(tree_R: PyTree) -> PyTree:
    """Mean over the leading replica dimension (an all-reduce over the replica axes)."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0, dtype=jnp.float32).astype(x.dtype), tree_R)


def diloco_optimizer(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    replica_axes: Sequence[str],
    init_error_feedback: Callable[[], dict] | None = None,
) -> optax.GradientTransformation:
    """The inner optimizer run per replica, in a state that also holds the outer loop's.

    init(params_R) -> {"inner": inner state, every leaf [R, ...]; "anchor": params
    [*shape] (the period's start: replica 0's, all are equal at init); "outer":
    the outer optimizer's state; "error_feedback": the compressed all-reduce's
    residuals, when ``init_error_feedback`` is given}.
    update(grads_R, state, params_R) -> (updates_R, state with the new inner
    state): each replica's own inner update, nothing crosses the replica axes;
    ``outer_update`` is what moves the rest.
    """
    spmd = _lead(replica_axes)

    def init(params_R):
        anchor = jax.tree.map(lambda p: p[0], params_R)
        state = {"inner": jax.vmap(inner.init)(params_R), "anchor": anchor, "outer": outer.init(anchor)}
        if init_error_feedback is not None:
            state["error_feedback"] = init_error_feedback()
        return state

    def update(grads_R, state, params_R=None):
        updates_R, inner_R = jax.vmap(inner.update, spmd_axis_name=spmd)(grads_R, state["inner"], params_R)
        return updates_R, {**state, "inner": inner_R}

    return optax.GradientTransformation(init, update)


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def check_moments(inner_state: PyTree, which: str) -> None:
    """Raises ValueError when ``which`` moments (``average_moments``) are to be averaged and the inner
    optimizer's state (any tree of its structure: arrays, abstract, or shardings) holds no Adam moments
    (``optax.ScaleByAdamState``, which AdamW, Adam and their chains keep): averaging would do nothing."""
    if which == "none" or any(_is_adam(n) for n in jax.tree.leaves(inner_state, is_leaf=_is_adam)):
        return
    raise ValueError(
        f"outer.average_moments={which} averages the inner optimizer's Adam moments ({MOMENT_NAMES[which]}), but "
        "its state holds none (no optax.ScaleByAdamState, as in optax.sgd's, with or without momentum), so it "
        "would do nothing; use outer.average_moments: none, or an inner optimizer built on optax.scale_by_adam"
    )


def average_moments(inner_R: PyTree, which: str, rows: Sequence[tuple[int, int] | None] | None = None) -> PyTree:
    """The inner optimizer state [R, ...] with AdamW's moments averaged over the replicas: ``first`` mu,
    ``both`` mu and nu, ``none`` nothing (SlowMo's buffer averaging, Wang et al. 2020).

    rows[i]: leaf i's leading rows to average (streaming: the fragment's; None: leave it), in the
    parameters' leaf order; rows None: every leaf whole. Each moment is one more all-reduce over the
    replica axes, of the pseudo-gradient's float32 bytes. Why: with beta1 = 0.9, mu remembers about
    10 steps, longer than a short period, so without it each replica re-enters the next period
    along its own noise.
    """
    names = {"none": (), "first": ("mu",), "both": ("mu", "nu")}[which]

    def average_leaf(x_R: jax.Array, r: tuple[int, int] | None, whole: bool) -> jax.Array:
        if r is None and not whole:
            return x_R  # outside the fragment
        if whole or x_R.ndim == 1 or r == (0, x_R.shape[1]):
            return jnp.broadcast_to(jnp.mean(x_R, axis=0), x_R.shape)
        assert r is not None  # r is None only outside the fragment or with whole, both returned above
        mean = jnp.broadcast_to(
            jnp.mean(take_rows(x_R, r, 1), axis=0, keepdims=True), (x_R.shape[0], r[1] - r[0], *x_R.shape[2:])
        )
        return lax.dynamic_update_slice_in_dim(x_R, mean, r[0], 1)

    def average(tree_R):
        leaves = jax.tree.leaves(tree_R)
        picked = [None] * len(leaves) if rows is None else list(rows)
        out = [average_leaf(x_R, r, rows is None) for x_R, r in zip(leaves, picked, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(tree_R), out)

    def fix(node):
        return node._replace(**{n: average(getattr(node, n)) for n in names}) if _is_adam(node) else node

    return jax.tree.map(fix, inner_R, is_leaf=_is_adam) if names else inner_R


def outer_update(
    params_R: PyTree,
    state: dict,
    outer: optax.GradientTransformation,
    reduce: Reduce | None = None,
    moments: str = "none",
) -> tuple[PyTree, dict]:
    """The outer step: (params_R, state) at the end of a period -> those that start the next.

    delta_R [R, *shape] = anchor - params_R (each replica's pseudo-gradient,
    on its own devices); its mean over R is the one all-reduce over the
    replica axes (``reduce``: compressed, with the residuals in
    ``state["error_feedback"]``); the outer optimizer moves the anchor by it,
    and every replica restarts from the new anchor (a broadcast, no traffic).
    The inner optimizer state is kept, its ``moments`` averaged (``average_moments``).
    """
    anchor = state["anchor"]
    delta_R = jax.tree.map(lambda a, p: a[None] - p, anchor, params_R)
    state = dict(state)
    if reduce is None:
        delta = replica_mean(delta_R)
    else:
        delta, state["error_feedback"] = reduce(delta_R, state["error_feedback"])
    updates, state["outer"] = outer.update(delta, state["outer"], anchor)
    state["anchor"] = optax.apply_updates(anchor, updates)
    if moments != "none":
        state["inner"] = average_moments(state["inner"], moments)
    replicas = jax.tree.leaves(params_R)[0].shape[0]
    return replicate(state["anchor"], replicas), state


def replica_metrics(metrics_R: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-replica metrics [R] -> the run's scalars: means, and root mean squares for norms.

    The loss is the mean of the replicas' losses (equal row counts: the
    batch's mean); a norm is the root mean square of the replicas' norms, NaN
    if any replica's is.
    """
    out = {}
    for name, value_R in metrics_R.items():
        if name.endswith("_norm"):
            out[name] = jnp.sqrt(jnp.mean(jnp.square(value_R)))
        else:
            out[name] = jnp.mean(value_R)
    return out
