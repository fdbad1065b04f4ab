"""What a pipeline stage can do on a tick: the executor's branches, and what each costs.

``StageFunctions`` is the model cut into pipeline pieces; ``StageActions``
turns them into one branch per code of ``shardlib.parallel.pipeline.table``
(forward, backward, and a split table's input-gradient and weight-gradient
halves), each taking and returning the ``Carry`` a stage holds from tick to
tick. What passes between stages (the activation, and its gradient back) is
any pytree of arrays whose leading dimension is the microbatch's rows; what
the embedding and the loss read is the microbatch's own pytree of inputs.

Every backward recomputes its chunk's forward from the saved stage input
(``jax.vjp``), so a stage keeps only stage inputs, as many as the table has
in flight; with ``recompute`` off, each forward keeps its pullback's
residuals for its backward instead (``saved``). A split (zero-bubble)
table's B runs the chunk through ``StageFunctions.tapped_stage`` and keeps
each weight use's input and output cotangent; its W takes the weight
gradients from them alone (``StageFunctions.weight_grads``), with no second
recomputation. Without recomputation a split table's F runs the tapped stage
under ``jax.vjp`` and keeps its residuals and its uses' inputs, and its B only
applies that pullback: F, B and W then cost one chunk forward each
(``tick_costs``), the units that let a lockstep tick hold the same work on
every stage (``plan.schedule_for`` splits 1F1B's tables for it too). ``shardlib.parallel.pipeline.stacked.stacked_stage_functions``
derives both from a layer that applies its weights through a ``WeightUse``.
Stage functions without them still run a split table, unsplit: its B
computes the input and the weight gradients at once and its W does nothing
(``tick_costs(split=False)``: B costs a whole backward, the bubbles W was to
fill stay idle). An eval (forward-only) table's last virtual stage only
scores its output (SCORE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shardlib.parallel.pipeline.saved import forward_keeping, pullback, residual_layout
from shardlib.parallel.pipeline.schedules import Schedule
from shardlib.parallel.pipeline.table import (
    BRANCHES,
    BWD,
    BWD_FIRST,
    BWD_INPUT,
    BWD_INPUT_FIRST,
    FWD,
    FWD_FIRST,
    FWD_LAST,
    FWD_ONLY,
    IDLE,
    SCORE,
    SCORE_ONLY,
    WGT,
    WGT_FIRST,
    TickTable,
)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageFunctions:
    """The model cut into pipeline pieces (all traced inside the shard_map).

    embed(outer, inputs) -> x                 first virtual stage's input
    stage(chunk_layers, x) -> x               one chunk of layers
    loss(outer, x, inputs) -> scalar          last virtual stage's head + loss (this shard's mean)
    ``outer`` is every parameter outside the layer stack (embedding, head);
    ``inputs`` one microbatch's inputs, the executor's per-microbatch pytree
    (``{"tokens": [B, L], "targets": [B, L]}``, masks, positions...) at index
    ``mb``; ``x`` any pytree of arrays with the microbatch's B rows leading
    (hidden states, a mask beside them, an encoder's output), the same
    structure, shapes and dtypes out of every chunk as into it. Leaves that
    are not floating point (a boolean mask) pass between stages but carry no
    gradient.

    With ``stats`` (zeros of a pytree of float32 scalars, e.g. a mixture of
    experts' load-balancing loss), ``stage`` returns ``(x, stats)``: the
    forward passes sum them over microbatches (``Carry.stats``); backward
    passes take ``x`` alone, so any loss among the statistics must reach the
    gradients through ``x`` itself (the project's MoE transformer adds it to ``x``
    with an identity whose gradient carries it).

    For split tables (zero-bubble: B and W apart), two more (without them a
    split table runs unsplit; see the module's docstring):
    tapped_stage(chunk_layers, x, probes) -> (x, inputs, outputs)
        ``stage`` with ``probes`` added to the outputs of its weight uses;
        ``inputs`` are those uses' inputs, ``outputs`` (probes None) their outputs.
    weight_grads(chunk_layers, inputs, output_cotangents) -> chunk grads
        the weight gradients from the uses' inputs and output cotangents alone.
    direct_weight_grads: B differentiates ``tapped_stage`` with respect to the chunk too and adds
        that gradient: the weights a stage applies outside its taps (biases, norm scales). Its taps
        must then stop the gradient of the weights they apply (W takes those), as
        ``stacked_stage_functions``'s do; off, B takes no weight gradient at all.
    """

    embed: Callable
    stage: Callable
    loss: Callable
    tapped_stage: Callable | None = None
    weight_grads: Callable | None = None
    stats: PyTree | None = None
    direct_weight_grads: bool = False

    @property
    def splits(self) -> bool:
        """Whether a split table's B and W run apart (``tapped_stage`` and ``weight_grads`` given)."""
        return self.tapped_stage is not None and self.weight_grads is not None

    def stage_output(self, chunk_layers, x):
        """``stage``'s activation alone (what backward passes differentiate)."""
        y = self.stage(chunk_layers, x)
        return y if self.stats is None else y[0]


def tick_costs(schedule: Schedule, recompute: bool = True, split: bool = True) -> dict[str, Fraction]:
    """What each action costs this executor, in forwards of a whole stage (its v chunks).

    A forward, an input gradient and a weight gradient take about the same
    matmul work. Every backward recomputes its chunk's forward from the saved
    input unless ``recompute`` is off: a whole backward is 3 forwards (2
    without recomputation), a split table's B 2 (the recomputation and the
    input gradient; 1 without recomputation, from the residuals its F kept) and
    its W 1 (the weight-gradient matmuls from what B kept). So a split table
    whose forwards keep their residuals runs units of one cost each: no
    lockstep tick waits for a dearer action than its own but the loss head's
    (``Schedule.lockstep_time``'s ``head``).
    ``split`` off: stage functions that cannot split (``StageFunctions.splits``) run a
    split table's B as a whole backward (3) and its W as nothing (0).
    """
    chunk = Fraction(1, schedule.virtual)
    whole = (3 if recompute else 2) * chunk
    if schedule.split_backward and not split:
        return {"F": chunk, "B": whole, "W": 0 * chunk}
    if schedule.split_backward:
        return {"F": chunk, "B": (2 if recompute else 1) * chunk, "W": chunk}
    return {"F": chunk, "B": whole}


def _as_cotangent(dy: PyTree) -> PyTree:
    """A held gradient as a pullback takes it: the leaves of integer or boolean activations as float0."""
    return jax.tree.map(lambda g: g if _differentiable(g) else np.zeros(g.shape, jax.dtypes.float0), dy)


def _as_held(ct: PyTree, like: PyTree) -> PyTree:
    """A pullback's cotangent as the buffer holds it: float0 leaves as zeros of the activation's dtype."""
    return jax.tree.map(lambda g, a: g if _differentiable(a) else jnp.zeros(a.shape, a.dtype), ct, like)


def _differentiable(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.inexact)


def _at(tree: PyTree, index) -> PyTree:
    return jax.tree.map(lambda a: a[index], tree)


def _set(tree: PyTree, index, value: PyTree) -> PyTree:
    return jax.tree.map(lambda buf, v: buf.at[index].set(v), tree, value)


class ResidualGroup(NamedTuple):
    """One residual buffer: what it holds per slot (``shapes``), the table column naming each tick's
    slot (``saved_slot``: an F's for its B; ``res_slot``: a split B's for its W), and the branch
    codes that keep a slot there."""

    shapes: PyTree
    column: str
    keeping: tuple[int, ...]


class Carry(NamedTuple):
    """What a stage carries from tick to tick.

    held: the activation's pytree, each leaf [act slots + grad slots + 1, B, ...]: stage inputs and
      output gradients in flight, in one buffer (``TickTable.buffer_slots``; the last slot is scratch,
      where a tick with nothing to keep writes).
    residuals: per ``ResidualGroup`` name, its buffer ([slots + 1, ...] each leaf): ``saved``, without
      recomputation, each F's pullback residuals (and in a split table its weight uses' inputs) until
      its B; ``res``, a split table's weight-use inputs and output cotangents
      (``StageFunctions.tapped_stage``) from B to W, and the first stage's embedding gradient; {}
      when neither. A branch reads the buffers and returns one slot per group: what it keeps, else zeros.
    layer_g, outer_g, loss: the gradient and loss sums (no gradient sums, {}, for a forward-only table).
    stats: the sums of ``StageFunctions.stats`` over the forward passes ({} without).
    """

    held: PyTree
    residuals: PyTree
    layer_g: PyTree
    outer_g: PyTree
    loss: jax.Array
    stats: PyTree


class StageActions:
    """What one stage can do on a tick, as the branches ``lax.switch`` picks from by the table's code.

    Each branch takes and returns the ``Carry``, with what it sends: a forward's
    activation, a backward's input gradient, zeros where it sends nothing.
    ``inputs``: the per-microbatch pytree ([M, B, ...] each leaf, this device's shard).
    """

    def __init__(self, fns: StageFunctions, outer, chunks, inputs, *, split: bool, recompute: bool = True):
        self.fns, self.outer, self.chunks, self.inputs = fns, outer, chunks, inputs
        self.x_shape = jax.eval_shape(fns.embed, outer, _at(inputs, 0))
        self.zeros_x = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.x_shape)
        self.split = split and fns.splits  # else a split table's B is a whole backward, its W nothing
        if self.split and not recompute and fns.stats is not None:
            raise ValueError(
                "pipeline.recompute=false with a split table needs stage functions without statistics "
                "(StageFunctions.stats: an MoE model's); use pipeline.recompute=true"
            )
        # What the residual buffers hold, each in its own slots (``ResidualGroup``): without
        # recomputation an F keeps its B's pullback residuals (``saved``); a split table's B
        # keeps its W's inputs (``res``).
        self.saved = None if recompute else self._saved_layout()
        self.groups: dict[str, ResidualGroup] = {}
        fwd_codes = (FWD, FWD_FIRST, FWD_LAST, FWD_ONLY)
        if self.saved is not None:
            stored = {"stored": self.saved.stored}
            if self.split:
                stored["inputs"] = self._tap_shapes()[0]
            self.groups["saved"] = ResidualGroup(stored, "saved_slot", fwd_codes)
        if self.split:
            inputs_shape, dys_shape = self._tap_shapes()
            shapes = {"inputs": inputs_shape, "dys": dys_shape, "d_embed": self.x_shape}
            self.groups["res"] = ResidualGroup(shapes, "res_slot", (BWD_INPUT, BWD_INPUT_FIRST))
        branches: list[Any] = [None] * len(BRANCHES)  # a callable per branch code, every slot filled below
        branches[IDLE] = lambda c, r: (c, self.zeros_x)
        branches[FWD] = lambda c, r: self.forward(c, r, first=False, last=False)
        branches[FWD_FIRST] = lambda c, r: self.forward(c, r, first=True, last=False)
        branches[FWD_LAST] = lambda c, r: self.forward(c, r, first=False, last=True)
        branches[FWD_ONLY] = lambda c, r: self.forward(c, r, first=True, last=True)
        branches[BWD] = lambda c, r: self.backward(c, r, first=False)
        branches[BWD_FIRST] = lambda c, r: self.backward(c, r, first=True)
        if self.split:
            branches[BWD_INPUT] = lambda c, r: self.backward_input(c, r, first=False)
            branches[BWD_INPUT_FIRST] = lambda c, r: self.backward_input(c, r, first=True)
            branches[WGT] = lambda c, r: self.weight_gradient(c, r, first=False)
            branches[WGT_FIRST] = lambda c, r: self.weight_gradient(c, r, first=True)
        else:
            branches[BWD_INPUT], branches[BWD_INPUT_FIRST] = branches[BWD], branches[BWD_FIRST]
            branches[WGT] = branches[WGT_FIRST] = branches[IDLE]
        branches[SCORE] = lambda c, r: self.forward(c, r, first=False, last=True, score_only=True)
        branches[SCORE_ONLY] = lambda c, r: self.forward(c, r, first=True, last=True, score_only=True)
        self.branches = branches

    def _tap_shapes(self):
        """The shapes of what a split table's weight uses take in and put out (``tapped_stage``)."""
        assert self.fns.tapped_stage is not None, "only a split table's stage functions are tapped"
        _, inputs, outputs = jax.eval_shape(self.fns.tapped_stage, self.chunk(0), self.zeros_x, None)
        return inputs, outputs

    def _saved_layout(self):
        """What an F keeps of its pullback: the tapped stage's (B then needs no weight gradient of
        its own, W takes them) in a split table, else the stage's."""
        if self.split:
            probes = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self._tap_shapes()[1])
            return residual_layout(self._tapped_run, self.zeros_x, probes, self.chunk(0), has_aux=True)
        return residual_layout(self.fns.stage, self.chunk(0), self.zeros_x, has_aux=self.fns.stats is not None)

    def _tapped_run(self, x, probes, chunk):
        """The tapped stage as a function of its input, probes and chunk: (output, the uses' inputs)."""
        assert self.fns.tapped_stage is not None, "only a split table's stage functions are tapped"
        y, inputs, _ = self.fns.tapped_stage(chunk, x, probes)
        return y, inputs

    def _zero_probes(self):
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self._tap_shapes()[1])

    def residual_slot_out(self, code: int) -> Callable:
        """Branch ``code`` returning, for each residual group, one slot in the carry: what it keeps
        there (a branch that keeps returns only its own groups), or zeros."""
        branch = self.branches[code]

        def run(carry, row):
            carry, send = branch(carry, row)
            slots = {
                name: carry.residuals[name]
                if code in group.keeping
                else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), group.shapes)
                for name, group in self.groups.items()
            }
            return carry._replace(residuals=slots), send

        return run

    def residual_slots(self, plan: TickTable, name: str) -> int:
        """The slots group ``name`` needs in ``plan`` (its column's most in flight)."""
        return plan.saved_slots if self.groups[name].column == "saved_slot" else plan.res_slots

    def initial_carry(self, plan: TickTable) -> Carry:
        """Zeros: the buffers ``plan`` needs, and the gradient sums unless it runs forwards only."""
        sums = (lambda tree: {}) if plan.schedule.forward_only else (lambda tree: jax.tree.map(jnp.zeros_like, tree))
        residuals = {name: self._residual_buffer(plan, name) for name in self.groups}
        return Carry(
            jax.tree.map(lambda a: jnp.zeros((plan.buffer_slots + 1, *a.shape), a.dtype), self.x_shape),
            residuals,
            sums(self.chunks),
            sums(self.outer),
            jnp.zeros((), jnp.float32),
            jax.tree.map(jnp.zeros_like, self.fns.stats or {}),
        )

    def _residual_buffer(self, plan: TickTable, name: str) -> PyTree:
        """Zeros of group ``name``'s buffer: its slots in ``plan`` and a scratch slot."""
        slots = self.residual_slots(plan, name) + 1
        return jax.tree.map(lambda a: jnp.zeros((slots, *a.shape), a.dtype), self.groups[name].shapes)

    def chunk(self, c):
        return _at(self.chunks, c)

    def microbatch(self, mb):
        """Microbatch ``mb``'s inputs (the pytree's leaves at index ``mb``)."""
        return _at(self.inputs, mb)

    def _stage_input(self, carry: Carry, row, first: bool):
        """The embedding of the microbatch on the first virtual stage, else the held activation."""
        if first:
            return self.fns.embed(self.outer, self.microbatch(row["microbatch"]))
        return _at(carry.held, row["act_slot"])

    def _add_layer_grads(self, carry: Carry, c, d_chunk) -> Carry:
        return carry._replace(layer_g=jax.tree.map(lambda g, d: g.at[c].add(d), carry.layer_g, d_chunk))

    def _add_embed_grads(self, carry: Carry, mb, dx) -> Carry:
        """The embedding's parameters' gradient, from the gradient of the first stage's input."""
        _, pull = jax.vjp(lambda o: self.fns.embed(o, self.microbatch(mb)), self.outer)
        d_outer = pull(_as_cotangent(dx))[0]
        return carry._replace(outer_g=jax.tree.map(jnp.add, carry.outer_g, d_outer))

    def forward(self, carry: Carry, row, first, last, score_only=False):
        """An F: the chunk on its input (the embedding's, on the first virtual stage); on the last, the
        loss, and unless ``score_only`` (an eval table's SCORE) the loss's gradients too."""
        mb, c = row["microbatch"], row["chunk"]
        x = self._stage_input(carry, row, first)
        if self.saved is None:
            y = self.fns.stage(self.chunk(c), x)
        else:
            carry, y = self._forward_keeping(carry, c, x)
        if self.fns.stats is not None:
            y, stats = y
            carry = carry._replace(stats=jax.tree.map(jnp.add, carry.stats, stats))
        inputs = self.microbatch(mb)
        if last and score_only:
            carry = carry._replace(loss=carry.loss + self.fns.loss(self.outer, y, inputs))
        elif last:
            mb_loss, pull = jax.vjp(lambda o, y: self.fns.loss(o, y, inputs), self.outer, y)
            d_outer, dy = pull(jnp.ones_like(mb_loss))
            carry = carry._replace(
                held=_set(carry.held, row["grad_slot"], _as_held(dy, y)),
                outer_g=jax.tree.map(jnp.add, carry.outer_g, d_outer),
                loss=carry.loss + mb_loss,
            )
        return carry, self.zeros_x if last else y

    def _forward_keeping(self, carry: Carry, c, x):
        """The chunk's forward keeping its pullback's residuals in the ``saved`` slot: the stage's,
        or in a split table the tapped stage's, with its weight uses' inputs beside them."""
        assert self.saved is not None, "forward keeps residuals only without recomputation"
        if not self.split:
            y, stored = forward_keeping(self.saved, self.fns.stage, self.chunk(c), x)
            return carry._replace(residuals={"saved": {"stored": stored}}), y
        (y, inputs), stored = forward_keeping(self.saved, self._tapped_run, x, self._zero_probes(), self.chunk(c))
        return carry._replace(residuals={"saved": {"stored": stored, "inputs": inputs}}), y

    def backward(self, carry: Carry, row, first):
        """A whole backward (B and W at once): the chunk's weight gradients and its input's (sent back)."""
        mb, c = row["microbatch"], row["chunk"]
        dy = _as_cotangent(_at(carry.held, row["grad_slot"]))
        if self.saved is not None:
            return self._backward_from_saved(carry, row, first, dy)
        if first:  # recompute the embedding: its parameters need gradients too

            def embed_and_run(o, w):
                return self.fns.stage_output(w, self.fns.embed(o, self.microbatch(mb)))

            _, pull = jax.vjp(embed_and_run, self.outer, self.chunk(c))
            d_outer, d_chunk = pull(dy)
            carry = carry._replace(outer_g=jax.tree.map(jnp.add, carry.outer_g, d_outer))
            dx = self.zeros_x
        else:
            x = _at(carry.held, row["act_slot"])
            _, pull = jax.vjp(self.fns.stage_output, self.chunk(c), x)
            d_chunk, dx = pull(dy)
            dx = _as_held(dx, x)
        return self._add_layer_grads(carry, c, d_chunk), dx

    def _backward_from_saved(self, carry: Carry, row, first, dy):
        """A backward applying the pullback its F kept (``saved``): no forward is recomputed
        but the embedding's, a lookup, whose gradient the first virtual stage needs."""
        mb, c = row["microbatch"], row["chunk"]
        assert self.saved is not None, "backward calls this only where F kept its pullback"
        x = self._stage_input(carry, row, first)
        stored = tuple(buf[row["saved_slot"]] for buf in carry.residuals["saved"]["stored"])
        d_chunk, dx = pullback(self.saved, stored, self.chunk(c), x)(dy)
        carry = self._add_layer_grads(carry, c, d_chunk)
        dx = _as_held(dx, x)
        if first:
            return self._add_embed_grads(carry, mb, dx), self.zeros_x
        return carry, dx

    def backward_input(self, carry: Carry, row, first):
        """A split table's B: the gradient with respect to the stage input (sent back), recomputing
        the forward once, or without recomputation from the residuals its F kept; the weight uses'
        inputs and output cotangents are kept for its W. With ``StageFunctions.direct_weight_grads``,
        also the gradients of the weights applied outside the taps."""
        c = row["chunk"]
        dy = _as_cotangent(_at(carry.held, row["grad_slot"]))
        x = self._stage_input(carry, row, first)
        probes = self._zero_probes()
        if self.saved is None:
            _, pull, inputs = jax.vjp(self._tapped_run, x, probes, self.chunk(c), has_aux=True)
        else:
            kept = _at(carry.residuals["saved"], row["saved_slot"])
            pull = pullback(self.saved, kept["stored"], x, probes, self.chunk(c))
            inputs = kept["inputs"]
        dx, dys, d_chunk = pull(dy)  # d_chunk unused (dead code) without direct weight gradients
        if self.fns.direct_weight_grads:
            carry = self._add_layer_grads(carry, c, d_chunk)
        dx = _as_held(dx, x)
        kept = {"inputs": inputs, "dys": dys, "d_embed": dx if first else self.zeros_x}
        return carry._replace(residuals={"res": kept}), self.zeros_x if first else dx

    def weight_gradient(self, carry: Carry, row, first):
        """A split table's W: the chunk's weight gradients (and the embedding's, on the first
        virtual stage) from what its B kept; no forward, no input-gradient chain."""
        mb, c = row["microbatch"], row["chunk"]
        kept = _at(carry.residuals["res"], row["res_slot"])
        assert self.fns.weight_grads is not None, "a W branch exists only where fns.splits (weight_grads given)"
        d_chunk = self.fns.weight_grads(self.chunk(c), kept["inputs"], kept["dys"])
        carry = self._add_layer_grads(carry, c, d_chunk)
        if first:
            carry = self._add_embed_grads(carry, mb, kept["d_embed"])
        return carry, self.zeros_x
