"""What a pipeline stage can do on a tick: the executor's branches, and what each costs.

``StageFunctions`` is the model cut into pipeline pieces; ``StageActions``
turns them into one branch per code of ``shardlib.parallel.pipeline.table``
(forward, backward, and a split table's input-gradient and weight-gradient
halves), each taking and returning the ``Carry`` a stage holds from tick to
tick. Every backward recomputes its chunk's forward from the saved stage
input (``jax.vjp``), so a stage keeps only stage inputs, as many as the
table has in flight. A split (zero-bubble) table's B runs the chunk through
``StageFunctions.tapped_stage`` and keeps each weight use's input and output
cotangent; its W takes the weight gradients from them alone
(``StageFunctions.weight_grads``), with no second recomputation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    WGT,
    WGT_FIRST,
    TickTable,
)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageFunctions:
    """The model cut into pipeline pieces (all traced inside the shard_map).

    embed(outer, tokens_BxL) -> x_BxLxD               first virtual stage's input
    stage(chunk_layers, x_BxLxD) -> x_BxLxD           one chunk of layers
    loss(outer, x_BxLxD, targets_BxL) -> scalar       last virtual stage's head + loss (mean)
    ``outer`` is every parameter outside the layer stack (embedding, head).

    With ``stats`` (zeros of a pytree of float32 scalars, e.g. a mixture of
    experts' load-balancing loss), ``stage`` returns ``(x_BxLxD, stats)``: the
    forward passes sum them over microbatches (``Carry.stats``); backward
    passes take ``x`` alone, so any loss among the statistics must reach the
    gradients through ``x`` itself (``models.moe.attach_loss``).

    For split tables (zero-bubble: B and W apart), two more:
    tapped_stage(chunk_layers, x_BxLxD, probes) -> (x_BxLxD, inputs, outputs)
        ``stage`` with ``probes`` added to the outputs of its weight uses;
        ``inputs`` are those uses' inputs, ``outputs`` (probes None) their outputs.
    weight_grads(chunk_layers, inputs, output_cotangents) -> chunk grads
        the weight gradients from the uses' inputs and output cotangents alone.
    """

    embed: Callable
    stage: Callable
    loss: Callable
    tapped_stage: Callable | None = None
    weight_grads: Callable | None = None
    stats: PyTree | None = None

    def stage_output(self, chunk_layers, x_BxLxD):
        """``stage``'s activation alone (what backward passes differentiate)."""
        y = self.stage(chunk_layers, x_BxLxD)
        return y if self.stats is None else y[0]


def tick_costs(schedule: Schedule) -> dict[str, Fraction]:
    """What each action costs this executor, in forwards of a whole stage (its v chunks).

    Every backward recomputes its chunk's forward from the saved input, and a
    forward, an input gradient and a weight gradient take about the same
    matmul work: a whole backward is 3 forwards, a split table's B 2 (the
    recomputation and the input gradient) and its W 1 (the weight-gradient
    matmuls from what B kept).
    """
    chunk = Fraction(1, schedule.virtual)
    if schedule.split_backward:
        return {"F": chunk, "B": 2 * chunk, "W": chunk}
    return {"F": chunk, "B": 3 * chunk}


class Carry(NamedTuple):
    """What a stage carries from tick to tick.

    acts, grads: [slots + 1, B, L, D] stage inputs and output gradients in flight (the last slot
      is scratch, where a tick with nothing to keep writes).
    residuals: a split table's weight-use inputs and output cotangents ([slots + 1, ...] each,
      ``StageFunctions.tapped_stage``) from B to W, and the first stage's embedding gradient;
      {} for other tables. A branch reads the buffer and returns one slot: what a B keeps, else zeros.
    layer_g, outer_g, loss: the gradient and loss sums.
    stats: the sums of ``StageFunctions.stats`` over the forward passes ({} without).
    """

    acts: jax.Array
    grads: jax.Array
    residuals: PyTree
    layer_g: PyTree
    outer_g: PyTree
    loss: jax.Array
    stats: PyTree


class StageActions:
    """What one stage can do on a tick, as the branches ``lax.switch`` picks from by the table's code.

    Each branch takes and returns the ``Carry``, with the activation to send
    forward and the gradient to send back.
    """

    def __init__(self, fns: StageFunctions, outer, chunks, tokens, targets, *, split: bool):
        self.fns, self.outer, self.chunks, self.tokens, self.targets = fns, outer, chunks, tokens, targets
        x_shape = jax.eval_shape(fns.embed, outer, tokens[0])
        self.x_shape = x_shape
        self.zeros_x = jnp.zeros(x_shape.shape, x_shape.dtype)
        self.residual_shapes = self._residual_shapes() if split else {}
        branches = [None] * len(BRANCHES)
        branches[IDLE] = lambda c, r: (c, self.zeros_x, self.zeros_x)
        branches[FWD] = lambda c, r: self.forward(c, r, first=False, last=False)
        branches[FWD_FIRST] = lambda c, r: self.forward(c, r, first=True, last=False)
        branches[FWD_LAST] = lambda c, r: self.forward(c, r, first=False, last=True)
        branches[FWD_ONLY] = lambda c, r: self.forward(c, r, first=True, last=True)
        branches[BWD] = lambda c, r: self.backward(c, r, first=False)
        branches[BWD_FIRST] = lambda c, r: self.backward(c, r, first=True)
        branches[BWD_INPUT] = lambda c, r: self.backward_input(c, r, first=False)
        branches[BWD_INPUT_FIRST] = lambda c, r: self.backward_input(c, r, first=True)
        branches[WGT] = lambda c, r: self.weight_gradient(c, r, first=False)
        branches[WGT_FIRST] = lambda c, r: self.weight_gradient(c, r, first=True)
        self.branches = branches

    def _residual_shapes(self):
        if self.fns.tapped_stage is None or self.fns.weight_grads is None:
            raise ValueError("a split (zero-bubble) schedule needs StageFunctions.tapped_stage and weight_grads")
        _, inputs, outputs = jax.eval_shape(self.fns.tapped_stage, self.chunk(0), self.zeros_x, None)
        return {"inputs": inputs, "dys": outputs, "d_embed": self.x_shape}

    def residual_slot_out(self, code: int) -> Callable:
        """Branch ``code`` returning one residual slot in the carry: a B's, or zeros."""
        branch = self.branches[code]
        if code in (BWD_INPUT, BWD_INPUT_FIRST):
            return branch

        def run(carry, row):
            carry, send_x, send_dx = branch(carry, row)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.residual_shapes)
            return carry._replace(residuals=zeros), send_x, send_dx

        return run

    def initial_carry(self, plan: TickTable) -> Carry:
        shape, dtype = self.x_shape.shape, self.x_shape.dtype
        return Carry(
            jnp.zeros((plan.act_slots + 1, *shape), dtype),
            jnp.zeros((plan.grad_slots + 1, *shape), dtype),
            jax.tree.map(lambda a: jnp.zeros((plan.res_slots + 1, *a.shape), a.dtype), self.residual_shapes),
            jax.tree.map(jnp.zeros_like, self.chunks),
            jax.tree.map(jnp.zeros_like, self.outer),
            jnp.zeros((), jnp.float32),
            jax.tree.map(jnp.zeros_like, self.fns.stats or {}),
        )

    def chunk(self, c):
        return jax.tree.map(lambda w: w[c], self.chunks)

    def forward(self, carry: Carry, row, first, last):
        mb, c = row["microbatch"], row["chunk"]
        x = self.fns.embed(self.outer, self.tokens[mb]) if first else carry.acts[row["act_slot"]]
        y = self.fns.stage(self.chunk(c), x)
        if self.fns.stats is not None:
            y, stats = y
            carry = carry._replace(stats=jax.tree.map(jnp.add, carry.stats, stats))
        if last:
            mb_loss, pull = jax.vjp(lambda o, y: self.fns.loss(o, y, self.targets[mb]), self.outer, y)
            d_outer, dy = pull(jnp.ones_like(mb_loss))
            carry = carry._replace(
                grads=carry.grads.at[row["grad_slot"]].set(dy),
                outer_g=jax.tree.map(jnp.add, carry.outer_g, d_outer),
                loss=carry.loss + mb_loss,
            )
        return carry, y, self.zeros_x

    def backward(self, carry: Carry, row, first):
        mb, c = row["microbatch"], row["chunk"]
        dy = carry.grads[row["grad_slot"]]
        outer_g = carry.outer_g
        if first:  # recompute the embedding: its parameters need gradients too

            def embed_and_run(o, w):
                return self.fns.stage_output(w, self.fns.embed(o, self.tokens[mb]))

            _, pull = jax.vjp(embed_and_run, self.outer, self.chunk(c))
            d_outer, d_chunk = pull(dy)
            outer_g = jax.tree.map(jnp.add, outer_g, d_outer)
            dx = self.zeros_x
        else:
            _, pull = jax.vjp(self.fns.stage_output, self.chunk(c), carry.acts[row["act_slot"]])
            d_chunk, dx = pull(dy)
        layer_g = jax.tree.map(lambda g, d: g.at[c].add(d), carry.layer_g, d_chunk)
        return carry._replace(layer_g=layer_g, outer_g=outer_g), self.zeros_x, dx

    def backward_input(self, carry: Carry, row, first):
        """A split table's B: the gradient with respect to the stage input (sent back), recomputing
        the forward once; the weight uses' inputs and output cotangents are kept for its W."""
        mb, c = row["microbatch"], row["chunk"]
        dy = carry.grads[row["grad_slot"]]
        x = self.fns.embed(self.outer, self.tokens[mb]) if first else carry.acts[row["act_slot"]]
        probes = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.residual_shapes["dys"])

        def run(x, probes):
            y, inputs, _ = self.fns.tapped_stage(self.chunk(c), x, probes)
            return y, inputs

        _, pull, inputs = jax.vjp(run, x, probes, has_aux=True)
        dx, dys = pull(dy)
        kept = {"inputs": inputs, "dys": dys, "d_embed": dx if first else self.zeros_x}
        return carry._replace(residuals=kept), self.zeros_x, self.zeros_x if first else dx

    def weight_gradient(self, carry: Carry, row, first):
        """A split table's W: the chunk's weight gradients (and the embedding's, on the first
        virtual stage) from what its B kept; no forward, no input-gradient chain."""
        mb, c = row["microbatch"], row["chunk"]
        kept = jax.tree.map(lambda buf: buf[row["res_slot"]], carry.residuals)
        d_chunk = self.fns.weight_grads(self.chunk(c), kept["inputs"], kept["dys"])
        layer_g = jax.tree.map(lambda g, d: g.at[c].add(d), carry.layer_g, d_chunk)
        outer_g = carry.outer_g
        if first:
            _, pull = jax.vjp(lambda o: self.fns.embed(o, self.tokens[mb]), self.outer)
            outer_g = jax.tree.map(jnp.add, outer_g, pull(kept["d_embed"])[0])
        return carry._replace(layer_g=layer_g, outer_g=outer_g), self.zeros_x, self.zeros_x
