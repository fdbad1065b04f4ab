"""One executor for every pipeline schedule: a scan over the ticks of a compiled table.

Inside a ``shard_map`` that makes the pipeline axis (``pipe_axis``, default
``pipe``: any mesh axis), the batch axes (``data``, ``expert``) and the length
axes (``seq``) manual, every stage holds its slice of the stacked layers and
its share of the inputs (its rows, its block of every sequence); ``model``
stays automatic, so tensor parallelism keeps working through the rules inside
each stage. The inputs are any pytree of per-microbatch arrays ``[M, B, ...]``
and the activations between stages any pytree of ``[B, ...]`` arrays
(``StageFunctions``). Each tick, a stage runs the
branch its column of the table names, then its one output (an activation or
a gradient, a pytree) moves to its neighbour below or above with ``ppermute``, or stays
on the stage where the next virtual stage is its own (a V's turn): each
tick's two permutes connect only the stage pairs the table has an arrival
for (``send_patterns``), so a stage with nothing to send sends nothing. The
branches themselves are ``shardlib.parallel.pipeline.actions``; only those the
table uses are traced. A split (zero-bubble) table's residuals, what each B
keeps for its W, live in a buffer the branches read and write one slot of.

The token axes are manual because XLA's SPMD partitioner aborts
(spmd_partitioner_util.cc, "partition_group_list") when a partial-manual
region leaves both a token axis (a batch axis, or ``seq``) and ``model``
automatic. Manual batch axes
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
from shardlib.parallel.pipeline.actions import StageActions, StageFunctions
from shardlib.parallel.pipeline.sends import Pairs, SendPatterns, send_patterns
from shardlib.parallel.pipeline.table import TickTable
from shardlib.parallel.reduction import gather_sharded, reduce_gradient

PyTree = Any
Branching = Literal["cond", "select"]
# Named scopes of the permutes, for profiles and HLO readers; the report counts their runs from
# the table (``send_patterns``), since every branch of a tick's switch looks taken every tick.
SEND_DOWN, SEND_UP = "pipeline_send_down", "pipeline_send_up"
_TABLE_FIELDS = (
    "branch",
    "microbatch",
    "chunk",
    "act_slot",
    "grad_slot",
    "recv_below_slot",
    "recv_above_slot",
    "recv_self_slot",
    "res_slot",
    "saved_slot",
)


def pipeline_loss_and_grads(
    plan: TickTable,
    fns: StageFunctions,
    layers: PyTree,
    outer: PyTree,
    inputs: PyTree,
    mesh: jax.sharding.Mesh,
    branching: Branching = "cond",
    *,
    layer_specs: PyTree | None = None,
    outer_specs: PyTree | None = None,
    input_specs: PyTree | None = None,
    batch_axes: tuple[str, ...] = (),
    length_axes: tuple[str, ...] = (),
    owned_axes: tuple[str, ...] = (),
    recompute: bool = True,
    reduce_dtype: str | None = None,
    pipe_axis: str = "pipe",
) -> tuple[jax.Array, PyTree, PyTree, PyTree]:
    """Mean loss over the microbatches and its gradients, by running ``plan``.

    Args:
      layers: stacked layer parameters, leading dimension sharded over ``pipe_axis``
        (stored in ``layer_order``; the table's p x v chunks of equal size).
      outer: the other parameters (replicated over ``pipe_axis``).
      inputs: any pytree of per-microbatch arrays ``[M, B, ...]`` (M = the schedule's m; tokens,
        targets, masks, positions...), B split over ``batch_axes``; ``StageFunctions.embed`` and
        ``loss`` get microbatch ``mb``'s pytree.
      layer_specs, outer_specs: each parameter's PartitionSpec (default:
        ``P(pipe_axis)`` and ``P()``); entries naming a batch axis are gathered
        for the step and their gradients reduce-scattered, other mesh axes are
        left to the partitioner.
      input_specs: each input leaf's PartitionSpec over the manual axes (default
        ``P(None, batch_axes, length_axes)``, the length entry only for leaves of 3 or more
        dimensions: a leaf ``[M, B]`` is per row).
      batch_axes: mesh axes the batch is split over, made manual here.
      length_axes: mesh axes the sequence is split over (``seq``), made manual too: each
        stage then runs on its own block of every sequence (``StageFunctions`` must say how).
      recompute: each backward recomputes its chunk's forward from the stage input (memory of
        the stage inputs only); off, each forward keeps its residuals for its backward
        (``shardlib.parallel.pipeline.saved``; a split table's F keeps its tapped stage's, so its B
        only applies them and its W takes the weight gradients; ``plan.schedule_for`` then splits
        1F1B's backwards too).
      reduce_dtype: what the gradients' reduce-scatters and all-reduces over the token axes carry
        (None: the parameters' dtype).
      pipe_axis: the mesh axis the stages are laid over (``PipelinePlan.axis``; a project's own
        mesh may call it anything).
    Returns:
      (loss, layer grads sharded like ``layers``, outer grads sharded like ``outer``,
      the stages' statistics summed over microbatches and stages: ``StageFunctions.stats``, {} without).
    """
    run, specs = _step_run(
        plan,
        fns,
        mesh,
        branching,
        (layers, outer, inputs),
        (layer_specs, outer_specs, input_specs),
        pipe_axis,
        batch_axes,
        length_axes,
    )
    run = dataclasses.replace(run, owned_axes=owned_axes, recompute=recompute, reduce_dtype=reduce_dtype)
    step = jax.shard_map(
        run.body,
        mesh=mesh,
        in_specs=specs,
        out_specs=(P(), specs[0], specs[1], P()),
        axis_names=run.manual,
        check_vma=False,
    )
    return step(layers, outer, inputs, *run.tables())


def pipeline_loss(
    plan: TickTable,
    fns: StageFunctions,
    layers: PyTree,
    outer: PyTree,
    inputs: PyTree,
    mesh: jax.sharding.Mesh,
    branching: Branching = "cond",
    *,
    layer_specs: PyTree | None = None,
    outer_specs: PyTree | None = None,
    input_specs: PyTree | None = None,
    batch_axes: tuple[str, ...] = (),
    length_axes: tuple[str, ...] = (),
    owned_axes: tuple[str, ...] = (),
    pipe_axis: str = "pipe",
) -> tuple[jax.Array, PyTree]:
    """Mean loss over the microbatches, by running a forward-only (eval) ``plan``
    (``schedules.forward_only``): every stage runs its own layers on the stage inputs it
    receives, so nothing but stage activations crosses ``pipe``, and no stage holds another's
    layers. Arguments as ``pipeline_loss_and_grads``'s; parameters sharded over a batch axis are
    gathered for the step, as there.

    Returns:
      (loss, the stages' statistics summed over microbatches and stages: ``StageFunctions.stats``, {} without).
    """
    if not plan.schedule.forward_only:
        raise ValueError(f"pipeline_loss runs a forward-only table; {plan.schedule.name} has backwards")
    run, specs = _step_run(
        plan,
        fns,
        mesh,
        branching,
        (layers, outer, inputs),
        (layer_specs, outer_specs, input_specs),
        pipe_axis,
        batch_axes,
        length_axes,
    )
    run = dataclasses.replace(run, owned_axes=owned_axes)
    step = jax.shard_map(
        run.score, mesh=mesh, in_specs=specs, out_specs=(P(), P()), axis_names=run.manual, check_vma=False
    )
    return step(layers, outer, inputs, *run.tables())


def _step_run(
    plan: TickTable,
    fns: StageFunctions,
    mesh: jax.sharding.Mesh,
    branching: Branching,
    arguments: tuple[PyTree, PyTree, PyTree],
    specs: tuple[PyTree | None, PyTree | None, PyTree | None],
    pipe_axis: str,
    batch_axes: tuple[str, ...],
    length_axes: tuple[str, ...],
) -> tuple[_StepRun, tuple]:
    """The shard_map body's settings, and its in_specs: the parameters' specs on the manual axes
    (default ``P(pipe_axis)`` for the layers, ``P()`` for the rest), the inputs', the table's."""
    layers, outer, inputs = arguments
    layer_specs, outer_specs, input_specs = specs
    _check_axes(mesh, pipe_axis, batch_axes, length_axes)
    _check_inputs(inputs, plan.schedule.microbatches)
    manual = {pipe_axis, *batch_axes, *length_axes}
    layer_specs = _manual_only(layer_specs or jax.tree.map(lambda _: P(pipe_axis), layers), manual, "layers")
    outer_specs = _manual_only(outer_specs or jax.tree.map(lambda _: P(), outer), manual, "outer")
    if input_specs is None:
        input_specs = jax.tree.map(lambda a: _input_spec(a.ndim, batch_axes, length_axes), inputs)
    input_specs = _manual_only(input_specs, manual, "inputs")
    token_axes = (*batch_axes, *length_axes)
    run = _StepRun(plan, fns, branching, layer_specs, outer_specs, token_axes, mesh, pipe_axis)
    return run, (layer_specs, outer_specs, input_specs, P(), P())


def _input_spec(ndim: int, batch_axes: tuple[str, ...], length_axes: tuple[str, ...]) -> P:
    """An input leaf's default spec: microbatches whole, rows over the batch axes, positions over the length axes."""
    entries = [None, batch_axes or None, length_axes or None][:ndim]
    return P(*entries)


def _check_axes(mesh: jax.sharding.Mesh, pipe_axis: str, batch_axes, length_axes) -> None:
    """Every axis the executor makes manual is one of the mesh's, named as the mesh names it."""
    for what, axes in (("pipe_axis", (pipe_axis,)), ("batch_axes", batch_axes), ("length_axes", length_axes)):
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"{what} names {missing}, not axes of the mesh {dict(mesh.shape)}; pass the mesh's own axis names "
                "(shardlib.core.rules.rename_mesh_axes maps shardlib's onto a project's)"
            )


def _check_inputs(inputs: PyTree, microbatches: int) -> None:
    """Every input leaf is [M, B, ...] with M the schedule's microbatches; errors name the leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(inputs)
    if not leaves:
        raise ValueError("the pipeline's inputs are empty: pass a pytree of [microbatches, rows, ...] arrays")
    for path, leaf in leaves:
        if leaf.ndim < 2 or leaf.shape[0] != microbatches:
            raise ValueError(
                f"inputs{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; every input is "
                f"[microbatches={microbatches}, rows, ...] (shardlib.parallel.accumulation.split_microbatches)"
            )


@dataclasses.dataclass(frozen=True)
class _StepRun:
    """The shard_map body of one step: gather the weights, scan the ticks, reduce the gradients."""

    plan: TickTable
    fns: StageFunctions
    branching: Branching
    layer_specs: PyTree
    outer_specs: PyTree
    token_axes: tuple[str, ...]  # the batch axes, then the length axes: every token's shard
    mesh: jax.sharding.Mesh
    pipe_axis: str = "pipe"
    owned_axes: tuple[str, ...] = ()
    recompute: bool = True
    reduce_dtype: str | None = None

    @property
    def manual(self) -> set[str]:
        """The shard_map's manual axes: the pipeline axis and every token axis."""
        return {self.pipe_axis, *self.token_axes}

    def tables(self) -> tuple[dict, jax.Array]:
        """The table's columns (branch codes renumbered to ``used_branches``) and each tick's send patterns."""
        table = {name: jnp.asarray(getattr(self.plan, name)) for name in _TABLE_FIELDS}
        table["branch"] = jnp.asarray(np.searchsorted(self.used_branches, self.plan.branch).astype(np.int32))
        return table, jnp.asarray(self.patterns.tick)

    def _axes(self, spec: P) -> tuple[str, ...]:
        """The token axes a parameter of ``spec`` is gathered and its gradient reduced over."""
        own = {a for entry in spec for a in axes_tuple(entry) if a in self.owned_axes}
        return tuple(a for a in self.token_axes if a not in own)

    @functools.cached_property
    def patterns(self) -> SendPatterns:
        return send_patterns(self.plan)

    @functools.cached_property
    def used_branches(self) -> np.ndarray:
        """The branch codes the table uses, sorted: the only branches traced (the table's codes are
        renumbered to positions in this list), so a split table's branches exist only where it runs."""
        return np.unique(self.plan.branch)

    def body(self, layers_local, outer_local, inputs, table, tick_patterns):
        """The training step: (loss, layer grads, outer grads, statistics)."""
        carry, layers_local = self._run(layers_local, outer_local, inputs, table, tick_patterns)
        return (*self._reduce(carry.layer_g, carry.outer_g, carry.loss, layers_local), self._stats(carry.stats))

    def score(self, layers_local, outer_local, inputs, table, tick_patterns):
        """The eval step (a forward-only table): (loss, statistics)."""
        carry, _ = self._run(layers_local, outer_local, inputs, table, tick_patterns)
        return jax.lax.psum(carry.loss, (self.pipe_axis, *self.token_axes)) * self._scale(), self._stats(carry.stats)

    def _run(self, layers_local, outer_local, inputs, table, tick_patterns):
        """Gathers the weights over the batch axes they are sharded over, then scans the ticks:
        (the last carry, this stage's gathered layers)."""
        v = self.plan.schedule.virtual
        layers_local = jax.tree.map(lambda w, s: gather_sharded(w, s, self._axes(s)), layers_local, self.layer_specs)
        outer = jax.tree.map(lambda w, s: gather_sharded(w, s, self._axes(s)), outer_local, self.outer_specs)
        chunks = jax.tree.map(lambda w: w.reshape(v, w.shape[0] // v, *w.shape[1:]), layers_local)
        split = self.plan.schedule.split_backward
        stage = StageActions(self.fns, outer, chunks, inputs, split=split, recompute=self.recompute)
        carry = stage.initial_carry(self.plan)
        tick = functools.partial(self._tick, stage, jax.lax.axis_index(self.pipe_axis))
        carry, _ = jax.lax.scan(tick, carry, (table, tick_patterns))
        return carry, layers_local

    def _scale(self) -> float:
        """1 / (microbatches x token shards): each shard's sums over its microbatches, to the step's mean.
        Every token shard (rows and sequence blocks alike) holds as many tokens."""
        shards = int(np.prod([self.mesh.shape[a] for a in self.token_axes]))
        return 1.0 / (self.plan.schedule.microbatches * shards)

    def _tick(self, stage: StageActions, index, carry, xs):
        """One tick: this stage's branch, then its output's permute down or up, over the pairs the table names."""
        tick_row, tick_pattern = xs
        row = {name: value[index] for name, value in tick_row.items()}
        branches = [stage.residual_slot_out(code) for code in self.used_branches]
        # The residual buffers go into the switch read-only and come out as one slot each (what a split
        # table's B, or without recomputation an F, keeps; zeros elsewhere), written after it: a
        # buffer the branches passed through would be copied by each of them (measured: ZB-H1 was
        # slower with in-place writes inside the branches).
        residuals = carry.residuals
        if self.branching == "cond":
            carry, send = jax.lax.switch(row["branch"], branches, carry, row)
        else:
            outs = [branch(carry, row) for branch in branches]
            carry, send = jax.tree.map(lambda *xs: jax.lax.select_n(row["branch"], *xs), *outs)
        # A W's (or B's, without recomputation) slot is free once it has run: its zeros may go there.
        for name, group in stage.groups.items():
            slot = _or_scratch(row[group.column], stage.residual_slots(self.plan, name))
            residuals = {**residuals, name: _set_slot(residuals[name], slot, carry.residuals[name])}
        carry = carry._replace(residuals=residuals)
        # One permute program per distinct pattern, chosen by the tick's pattern index: the same on
        # every device, so all of them take the same branch (pattern 0: nothing arrives, no permute).
        arrivals = {
            "recv_below_slot": jax.lax.switch(tick_pattern[0], self._permutes(self.patterns.down, SEND_DOWN), send),
            "recv_above_slot": jax.lax.switch(tick_pattern[1], self._permutes(self.patterns.up, SEND_UP), send),
        }
        if self.plan.sends_to_itself:
            arrivals["recv_self_slot"] = send
        # A slot of -1 means nothing arrives: write into a scratch slot past the end.
        held = carry.held
        for column, got in arrivals.items():
            held = _set_slot(held, _or_scratch(row[column], self.plan.buffer_slots), got)
        return carry._replace(held=held), None

    def _permutes(self, patterns: tuple[Pairs, ...], scope: str) -> list[Callable]:
        send = functools.partial(_send, axis=self.pipe_axis, scope=scope)
        return [functools.partial(send, pairs=pairs) if pairs else _nothing for pairs in patterns]

    def _reduce(self, layer_g, outer_g, loss, layers_local):
        """The step's mean loss and gradients, reduced over the token axes as the parameters are sharded."""
        # Each token shard holds the gradient of its own mean loss; their mean is the step's.
        scale = self._scale()
        layer_g = jax.tree.map(lambda g, w: (g * scale).reshape(w.shape), layer_g, layers_local)
        dtype = self.reduce_dtype
        layer_g = jax.tree.map(
            lambda g, s: reduce_gradient(g, s, self._axes(s), dtype=dtype), layer_g, self.layer_specs
        )
        # Only the first and last stages touch the outer parameters and the loss. Sums commute:
        # over the batch axes first, so that with FSDP only the shard crosses pipe.
        outer_g = jax.tree.map(
            lambda g, s: jax.lax.psum(reduce_gradient(g * scale, s, self._axes(s), dtype=dtype), self.pipe_axis),
            outer_g,
            self.outer_specs,
        )
        return jax.lax.psum(loss, (self.pipe_axis, *self.token_axes)) * scale, layer_g, outer_g

    def _stats(self, stats):
        """The stages' statistics summed over the stages; each stage's are already whole over the token axes."""
        return jax.tree.map(lambda s: jax.lax.psum(s, self.pipe_axis), stats)


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


def _send(x: PyTree, pairs: Pairs, axis: str, scope: str) -> PyTree:
    """Stage s's ``x`` (every leaf) to stage t for each (s, t) in ``pairs``; a stage no pair targets gets zeros."""
    with jax.named_scope(scope):
        return jax.lax.ppermute(x, axis, [(int(s), int(t)) for s, t in pairs])


def _nothing(x: PyTree) -> PyTree:
    """What arrives on a tick with no permute: zeros of each leaf's shape and dtype. Not zeros_like:
    that copies x's sharding, which can name the whole mesh's axes as automatic (a stage's sharding
    constraint), a mesh JAX refuses inside the manual region."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), x)


def _set_slot(buffers: PyTree, slot: jax.Array, value: PyTree) -> PyTree:
    return jax.tree.map(lambda buf, x: buf.at[slot].set(x), buffers, value)


def _or_scratch(slot: jax.Array, slots: int) -> jax.Array:
    return jnp.where(slot < 0, slots, slot)
