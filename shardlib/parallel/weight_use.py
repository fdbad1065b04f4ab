"""The weight-use hook: the one thing the strategies need from a model's matmuls.

A model applies each of its weights through a ``WeightUse``, a callable
``use(name, x, w) -> y``, instead of calling ``jnp.einsum`` itself. The
model describes every use once, in a table of ``WeightUseSpec`` (how the
weight is applied, the input's name, the activations' logical axes), and
otherwise never knows which strategy runs it:

* ``PlainWeightUse(uses)``: applies the table, nothing more (one device, or the
  partitioner's own reductions);
* ``shardlib.parallel.reduction.ReducedWeightUse``: the same forward, with each
  weight gradient reduced over the token axes at the minimum bytes;
* ``WeightTap``: records each use's input and adds a probe to its output, so
  a zero-bubble pipeline's backward can take the input gradient first
  (B) and the weight gradients later (W) from what B kept, with
  ``tapped_weight_grads`` and no recomputation.

``apply`` must be linear in the weight (every matmul, elementwise scale and
table lookup is): the weight gradient is then the transpose of the use at
the saved input, which is what ``tapped_weight_grads`` and the per-use
reduction compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax

WeightUse = Callable[[str, jax.Array, jax.Array], jax.Array]
"""(weight name in the model's table, input, weight) -> output: how a model applies its weights."""


class WeightUseSpec(NamedTuple):
    """How a layer applies one weight: ``apply(input, weight)``, the input's name, and both activations' axes.

    ``input``: a name for the input, shared by uses of the same input (a tap records it once).
    ``input_axes`` / ``output_axes``: the logical axes of the input and the output (what the
    caller's ``shard`` constrains them by), for a use that computes the weight gradient on each
    device's own blocks.
    """

    apply: Callable[[jax.Array, jax.Array], jax.Array]
    input: str
    input_axes: tuple[str | None, ...] = ("batch", "length", "embed")
    output_axes: tuple[str | None, ...] = ("batch", "length", "embed")


class PlainWeightUse:
    """The default ``WeightUse`` of a table: ``uses[name].apply(x, w)``."""

    def __init__(self, uses: Mapping[str, WeightUseSpec]):
        self.uses = uses

    def __call__(self, name: str, x: jax.Array, w: jax.Array) -> jax.Array:
        return self.uses[name].apply(x, w)


class WeightTap:
    """A ``WeightUse`` that records what the weight gradient needs, for a backward split in two.

    Records each use's input (by its ``WeightUseSpec.input`` name) and adds ``probes[name]``
    (zeros of the output's shape) to each output: the gradient with respect to a probe is that
    output's cotangent, which the input-gradient pass computes anyway. ``tapped_weight_grads``
    then needs no recomputation, only the weight-gradient matmuls. Without probes it records
    each output instead, for the probes' shapes. ``use`` applies the weights (default: the table's
    plain apply).
    """

    def __init__(
        self,
        uses: Mapping[str, WeightUseSpec],
        probes: Mapping[str, jax.Array] | None = None,
        use: WeightUse | None = None,
    ):
        self.uses = uses
        self.probes = probes
        self.use = use or PlainWeightUse(uses)
        self.inputs: dict[str, jax.Array] = {}
        self.outputs: dict[str, jax.Array] = {}

    def __call__(self, name: str, x: jax.Array, w: jax.Array) -> jax.Array:
        self.inputs[self.uses[name].input] = x
        y = self.use(name, x, w)
        if self.probes is None:
            self.outputs[name] = y
            return y
        return y + self.probes[name]


def tapped_weight_grads(
    uses: Mapping[str, WeightUseSpec],
    weights: Mapping[str, jax.Array],
    inputs: Mapping[str, jax.Array],
    output_cotangents: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
    """Each weight's gradient from a ``WeightTap``'s recorded inputs and its outputs' cotangents.

    The W half of a split backward: the transpose of each use (linear in its weight) at the
    saved input, nothing else. ``weights``: name -> weight for every use to differentiate
    (each name in ``uses`` and in ``output_cotangents``). Returns name -> gradient, shaped
    and typed as the weight.
    """

    def grad(name: str) -> jax.Array:
        x = inputs[uses[name].input]
        _, pull = jax.vjp(lambda w: uses[name].apply(x, w), weights[name])
        grad_w: jax.Array = pull(output_cotangents[name])[0]
        return grad_w

    return {name: grad(name) for name in weights}
