"""One executor for every pipeline schedule: a scan over the ticks of a compiled table.

Inside a ``shard_map`` that makes ``pipe`` and the batch axes (``data``,
``expert``) manual, every stage holds its slice of the stacked layers and its
share of the batch; ``model`` (and ``seq``) stay automatic, so tensor
parallelism keeps working through the rules inside each stage. Each tick, a
stage runs the branch its column of the table names, then activations move one
stage forward and gradients one stage back with ``ppermute``: each tick's
permute connects only the stage pairs the table has an arrival for
(``send_patterns``), so a stage with nothing to send sends nothing. Backward passes
recompute their stage's forward from the saved input (``jax.vjp``), so a stage
keeps only stage inputs: as many as the table has in flight.

The batch axes are manual because XLA's SPMD partitioner aborts
(spmd_partitioner_util.cc, "partition_group_list") when a partial-manual
region leaves both a batch axis and ``model`` automatic. Manual batch axes
also put the data-parallel gradient reduction where it belongs: once per step,
after the last tick, rather than wherever the partitioner chooses. Parameters
sharded over a batch axis (FSDP) are all-gathered once at the start of the
step and their gradients reduce-scattered once at the end (MaxText's
"all-gather once" pipeline FSDP): the sharded copy saves memory at rest and in
the optimizer state, the gathered stage weights live for the step.

Branches are chosen in one of two ways:
* ``cond``: ``lax.switch``; a stage computes only its own branch. Collectives
  inside a branch (tensor or FSDP parallelism) then run only on the devices
  of that stage, which is what NCCL does on GPUs.
* ``select``: every branch is computed and the result selected. XLA:CPU runs
  each collective as one rendezvous of all local devices, so a collective
  inside a branch some devices skip would hang; ``select`` costs compute but
  is safe everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from shardlib.core.rules import axes_tuple
from shardlib.parallel.pipeline.table import (
    BRANCHES,
    BWD,
    BWD_FIRST,
    FWD,
    FWD_FIRST,
    FWD_LAST,
    FWD_ONLY,
    IDLE,
    TickTable,
)

PyTree = Any
Branching = Literal["cond", "select"]
# Named scopes of the permutes, for profiles and HLO readers; the report counts their runs from
# the table (``send_patterns``), since every branch of a tick's switch looks taken every tick.
FORWARD_SEND, BACKWARD_SEND = "pipeline_forward_send", "pipeline_backward_send"
Pairs = tuple[tuple[int, int], ...]  # (source stage, target stage) of one permute


@dataclasses.dataclass(frozen=True)
class StageFunctions:
    """The model cut into pipeline pieces (all traced inside the shard_map).

    embed(outer, tokens_BxL) -> x_BxLxD               first virtual stage's input
    stage(chunk_layers, x_BxLxD) -> x_BxLxD           one chunk of layers
    loss(outer, x_BxLxD, targets_BxL) -> scalar       last virtual stage's head + loss (mean)
    ``outer`` is every parameter outside the layer stack (embedding, head).
    """

    embed: Callable
    stage: Callable
    loss: Callable


def layer_order(n_layers: int, stages: int, virtual: int) -> np.ndarray:
    """Logical layer index of each stored layer.

    The stack is sharded contiguously over ``pipe``, so device s stores layers
    [s*L/p, (s+1)*L/p), which it runs as its chunks 0..v-1; chunk c of device s
    is virtual stage c*p + s. With v = 1 this is the identity.
    """
    per_chunk = n_layers // (stages * virtual)
    order = np.empty(n_layers, np.int64)
    for s in range(stages):
        for c in range(virtual):
            for j in range(per_chunk):
                order[s * virtual * per_chunk + c * per_chunk + j] = (c * stages + s) * per_chunk + j
    return order


_TABLE_FIELDS = ("branch", "microbatch", "chunk", "act_slot", "grad_slot", "recv_act_slot", "recv_grad_slot")


def pipeline_loss_and_grads(
    plan: TickTable,
    fns: StageFunctions,
    layers: PyTree,
    outer: PyTree,
    tokens_MxBxL: jax.Array,
    targets_MxBxL: jax.Array,
    mesh: jax.sharding.Mesh,
    branching: Branching = "cond",
    *,
    layer_specs: PyTree | None = None,
    outer_specs: PyTree | None = None,
    batch_axes: tuple[str, ...] = (),
) -> tuple[jax.Array, PyTree, PyTree]:
    """Mean loss over the microbatches and its gradients, by running ``plan``.

    Args:
      layers: stacked layer parameters, leading dimension sharded over ``pipe``.
      outer: the other parameters (replicated over ``pipe``).
      tokens_MxBxL, targets_MxBxL: M microbatches (M = the schedule's m), B
        split over ``batch_axes``.
      layer_specs, outer_specs: each parameter's PartitionSpec (default:
        ``P("pipe")`` and ``P()``); entries naming a batch axis are gathered
        for the step and their gradients reduce-scattered, other mesh axes are
        left to the partitioner.
      batch_axes: mesh axes the batch is split over, made manual here.
    Returns:
      (loss, layer grads sharded like ``layers``, outer grads sharded like ``outer``).
    """
    manual = {"pipe", *batch_axes}
    layer_specs = _manual_only(layer_specs or jax.tree.map(lambda _: P("pipe"), layers), manual, "layers")
    outer_specs = _manual_only(outer_specs or jax.tree.map(lambda _: P(), outer), manual, "outer")
    run = _StepRun(plan, fns, branching, layer_specs, outer_specs, batch_axes, mesh)
    batch_spec = P(None, batch_axes or None)
    step = jax.shard_map(
        run.body,
        mesh=mesh,
        in_specs=(layer_specs, outer_specs, batch_spec, batch_spec, P(), P()),
        out_specs=(P(), layer_specs, outer_specs),
        axis_names=manual,
        check_vma=False,
    )
    table = {name: jnp.asarray(getattr(plan, name)) for name in _TABLE_FIELDS}
    return step(layers, outer, tokens_MxBxL, targets_MxBxL, table, jnp.asarray(run.patterns.tick))


@dataclasses.dataclass(frozen=True)
class _StepRun:
    """The shard_map body of one step: gather the weights, scan the ticks, reduce the gradients."""

    plan: TickTable
    fns: StageFunctions
    branching: Branching
    layer_specs: PyTree
    outer_specs: PyTree
    batch_axes: tuple[str, ...]
    mesh: jax.sharding.Mesh

    @functools.cached_property
    def patterns(self) -> SendPatterns:
        return send_patterns(self.plan)

    def body(self, layers_local, outer_local, tokens, targets, table, tick_patterns):
        v = self.plan.schedule.virtual
        layers_local = jax.tree.map(lambda w, s: _gather(w, s, self.batch_axes), layers_local, self.layer_specs)
        outer = jax.tree.map(lambda w, s: _gather(w, s, self.batch_axes), outer_local, self.outer_specs)
        chunks = jax.tree.map(lambda w: w.reshape(v, w.shape[0] // v, *w.shape[1:]), layers_local)
        stage = _Stage(self.fns, outer, chunks, tokens, targets)
        carry = stage.initial_carry(self.plan)
        tick = functools.partial(self._tick, stage, jax.lax.axis_index("pipe"))
        (_, _, layer_g, outer_g, loss), _ = jax.lax.scan(tick, carry, (table, tick_patterns))
        return self._reduce(layer_g, outer_g, loss, layers_local)

    def _tick(self, stage: _Stage, index, carry, xs):
        """One tick: this stage's branch, then each direction's permute over the pairs the table names."""
        tick_row, tick_pattern = xs
        row = {name: value[index] for name, value in tick_row.items()}
        if self.branching == "cond":
            carry, send_x, send_dx = jax.lax.switch(row["branch"], stage.branches, carry, row)
        else:
            outs = [branch(carry, row) for branch in stage.branches]
            carry, send_x, send_dx = jax.tree.map(lambda *xs: jax.lax.select_n(row["branch"], *xs), *outs)
        # One permute program per distinct pattern, chosen by the tick's pattern index: the same on
        # every device, so all of them take the same branch (pattern 0: nothing arrives, no permute).
        got_x = jax.lax.switch(tick_pattern[0], self._permutes(self.patterns.forward, FORWARD_SEND), send_x)
        got_dx = jax.lax.switch(tick_pattern[1], self._permutes(self.patterns.backward, BACKWARD_SEND), send_dx)
        act_buf, grad_buf, layer_g, outer_g, loss = carry
        # A slot of -1 means nothing arrives: write into a scratch slot past the end.
        act_buf = act_buf.at[_or_scratch(row["recv_act_slot"], self.plan.act_slots)].set(got_x)
        grad_buf = grad_buf.at[_or_scratch(row["recv_grad_slot"], self.plan.grad_slots)].set(got_dx)
        return (act_buf, grad_buf, layer_g, outer_g, loss), None

    @staticmethod
    def _permutes(patterns: tuple[Pairs, ...], scope: str) -> list[Callable]:
        return [functools.partial(_send, pairs=pairs, scope=scope) if pairs else jnp.zeros_like for pairs in patterns]

    def _reduce(self, layer_g, outer_g, loss, layers_local):
        """The step's mean loss and gradients, reduced over the batch axes as the parameters are sharded."""
        shards = int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))
        # Each batch shard holds the gradient of its own mean loss; their mean is the step's.
        scale = 1.0 / (self.plan.schedule.microbatches * shards)
        layer_g = jax.tree.map(lambda g, w: (g * scale).reshape(w.shape), layer_g, layers_local)
        layer_g = jax.tree.map(lambda g, s: _reduce(g, s, self.batch_axes), layer_g, self.layer_specs)
        # Only the first and last stages touch the outer parameters and the loss. Sums commute:
        # over the batch axes first, so that with FSDP only the shard crosses pipe.
        outer_g = jax.tree.map(
            lambda g, s: jax.lax.psum(_reduce(g * scale, s, self.batch_axes), "pipe"), outer_g, self.outer_specs
        )
        return jax.lax.psum(loss, ("pipe", *self.batch_axes)) * scale, layer_g, outer_g


class _Stage:
    """What one stage can do on a tick, as the branches ``lax.switch`` picks from by the table's code.

    The carry is (activation buffer, gradient buffer, layer grads, outer grads, loss sum);
    each branch returns (carry, activation to send forward, gradient to send back).
    """

    def __init__(self, fns: StageFunctions, outer, chunks, tokens, targets):
        self.fns, self.outer, self.chunks, self.tokens, self.targets = fns, outer, chunks, tokens, targets
        x_shape = jax.eval_shape(fns.embed, outer, tokens[0])
        self.x_shape = x_shape
        self.zeros_x = jnp.zeros(x_shape.shape, x_shape.dtype)
        branches = [None] * len(BRANCHES)
        branches[IDLE] = lambda c, r: (c, self.zeros_x, self.zeros_x)
        branches[FWD] = lambda c, r: self.forward(c, r, first=False, last=False)
        branches[FWD_FIRST] = lambda c, r: self.forward(c, r, first=True, last=False)
        branches[FWD_LAST] = lambda c, r: self.forward(c, r, first=False, last=True)
        branches[FWD_ONLY] = lambda c, r: self.forward(c, r, first=True, last=True)
        branches[BWD] = lambda c, r: self.backward(c, r, first=False)
        branches[BWD_FIRST] = lambda c, r: self.backward(c, r, first=True)
        self.branches = branches

    def initial_carry(self, plan: TickTable):
        shape, dtype = self.x_shape.shape, self.x_shape.dtype
        return (
            jnp.zeros((plan.act_slots + 1, *shape), dtype),
            jnp.zeros((plan.grad_slots + 1, *shape), dtype),
            jax.tree.map(jnp.zeros_like, self.chunks),
            jax.tree.map(jnp.zeros_like, self.outer),
            jnp.zeros((), jnp.float32),
        )

    def chunk(self, c):
        return jax.tree.map(lambda w: w[c], self.chunks)

    def forward(self, carry, row, first, last):
        act_buf, grad_buf, layer_g, outer_g, loss = carry
        mb, c = row["microbatch"], row["chunk"]
        x = self.fns.embed(self.outer, self.tokens[mb]) if first else act_buf[row["act_slot"]]
        y = self.fns.stage(self.chunk(c), x)
        if last:
            mb_loss, pull = jax.vjp(lambda o, y: self.fns.loss(o, y, self.targets[mb]), self.outer, y)
            d_outer, dy = pull(jnp.ones_like(mb_loss))
            grad_buf = grad_buf.at[row["grad_slot"]].set(dy)
            outer_g = jax.tree.map(jnp.add, outer_g, d_outer)
            loss = loss + mb_loss
        return (act_buf, grad_buf, layer_g, outer_g, loss), y, self.zeros_x

    def backward(self, carry, row, first):
        act_buf, grad_buf, layer_g, outer_g, loss = carry
        mb, c = row["microbatch"], row["chunk"]
        dy = grad_buf[row["grad_slot"]]
        if first:  # recompute the embedding: its parameters need gradients too

            def embed_and_run(o, w):
                return self.fns.stage(w, self.fns.embed(o, self.tokens[mb]))

            _, pull = jax.vjp(embed_and_run, self.outer, self.chunk(c))
            d_outer, d_chunk = pull(dy)
            outer_g = jax.tree.map(jnp.add, outer_g, d_outer)
            dx = self.zeros_x
        else:
            _, pull = jax.vjp(self.fns.stage, self.chunk(c), act_buf[row["act_slot"]])
            d_chunk, dx = pull(dy)
        layer_g = jax.tree.map(lambda g, d: g.at[c].add(d), layer_g, d_chunk)
        return (act_buf, grad_buf, layer_g, outer_g, loss), self.zeros_x, dx


@dataclasses.dataclass(frozen=True)
class SendPatterns:
    """The permutes of a step, as a table: each direction's distinct sets of stage pairs, and which tick uses which.

    forward[i], backward[i]: the (source, target) stage pairs of pattern i; pattern 0 is
      empty (nothing arrives that tick: no permute runs).
    tick: [ticks, 2] int32, the forward (column 0) and backward (1) pattern of each tick.
    """

    forward: tuple[Pairs, ...]
    backward: tuple[Pairs, ...]
    tick: np.ndarray

    def runs(self) -> dict[Pairs, int]:
        """Ticks per step that run a permute over each distinct set of pairs, both directions together."""
        runs: dict[Pairs, int] = {}
        for column, patterns in enumerate((self.forward, self.backward)):
            for index, count in zip(*np.unique(self.tick[:, column], return_counts=True), strict=True):
                if patterns[index]:
                    runs[patterns[index]] = runs.get(patterns[index], 0) + int(count)
        return runs

    def sends(self) -> tuple[int, int]:
        """(forward, backward): microbatches sent per step, over all stages (one per pair and tick)."""
        return tuple(
            int(sum(len(patterns[i]) for i in self.tick[:, column]))
            for column, patterns in enumerate((self.forward, self.backward))
        )


def send_patterns(plan: TickTable) -> SendPatterns:
    """Each tick's permute pairs, from the table's arrivals: an activation arriving at stage s
    comes from stage s - 1 (mod p), a gradient from s + 1 (mod p)."""
    p = plan.schedule.stages
    columns = []
    for arrivals, step in ((plan.recv_act_slot, -1), (plan.recv_grad_slot, 1)):
        patterns: dict[Pairs, int] = {(): 0}
        index = [
            patterns.setdefault(tuple(((s + step) % p, s) for s in np.flatnonzero(row >= 0)), len(patterns))
            for row in arrivals
        ]
        columns.append((tuple(patterns), index))
    (forward, f_index), (backward, b_index) = columns
    return SendPatterns(forward, backward, np.stack([f_index, b_index], axis=1).astype(np.int32))


def _manual_only(specs: PyTree, manual: set[str], what: str) -> PyTree:
    """``specs`` with only the manual axes kept: the partial-manual shard_map's in/out specs.

    A dimension split over a manual and an automatic axis at once cannot be
    expressed in a partial-manual shard_map, so it is refused by name.
    """

    def keep(path, spec):
        entries = []
        for dim, entry in enumerate(spec):
            axes = axes_tuple(entry)
            kept = tuple(a for a in axes if a in manual)
            if kept and len(kept) != len(axes):
                raise ValueError(
                    f"{what}/{jax.tree_util.keystr(path)}: dimension {dim} is split over {axes}, mixing the "
                    f"pipeline's manual axes {sorted(manual)} with others; the pipeline cannot shard it that way"
                )
            entries.append(kept[0] if len(kept) == 1 else (kept or None))
        return P(*entries)

    return jax.tree_util.tree_map_with_path(keep, specs, is_leaf=lambda x: isinstance(x, P))


def _gather(w: jax.Array, spec: P, batch_axes: tuple[str, ...]) -> jax.Array:
    """The whole parameter (still split over ``pipe``) from its shards over the batch axes."""
    for dim, entry in enumerate(spec):
        axes = tuple(a for a in axes_tuple(entry) if a in batch_axes)
        if axes:
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w


def _reduce(g: jax.Array, spec: P, batch_axes: tuple[str, ...]) -> jax.Array:
    """Sums a gradient over the batch axes, leaving it sharded as its parameter is."""
    summed = set()
    for dim, entry in enumerate(spec):
        axes = tuple(a for a in axes_tuple(entry) if a in batch_axes)
        if axes:
            g = jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
            summed.update(axes)
    rest = tuple(a for a in batch_axes if a not in summed)
    return jax.lax.psum(g, rest) if rest else g


def _send(x: jax.Array, pairs: Pairs, scope: str) -> jax.Array:
    """Stage s's ``x`` to stage t for each (s, t) in ``pairs``; a stage no pair targets gets zeros."""
    with jax.named_scope(scope):
        return jax.lax.ppermute(x, "pipe", [(int(s), int(t)) for s, t in pairs])


def _or_scratch(slot: jax.Array, slots: int) -> jax.Array:
    return jnp.where(slot < 0, slots, slot)
