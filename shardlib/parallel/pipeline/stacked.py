"""Stage functions from one layer: a chunk runs its slice of the stacked layers in sequence.

A model whose layers are stacked (one pytree of ``[n_layers, ...]`` leaves:
``nn.scan`` with ``variable_axes={"params": 0}``, ``nnx.vmap``, or a plain
stack) gives the pipeline a ``layer(layer_params, x) -> x``, and
``stacked_stage_functions`` makes the executor's ``StageFunctions``: a
chunk's stage is a ``lax.scan`` of the layer over the chunk's layers.

The zero-bubble split (B apart from W) comes from the weight-use hook
(``shardlib.parallel.weight_use``): when the layer applies its weights
through a ``use`` argument and the caller gives the table of
``WeightUseSpec``, then
* B runs each layer through a ``WeightTap`` whose uses stop their weight's
  gradient: the input gradient, each use's input and output cotangent (its
  probe's), and the gradients of the weights the layer applies itself
  (biases, norm scales), all in one pass over the recomputed forward;
* W takes the tapped weights' gradients from what B kept: the transpose of
  each use at its saved input (``WeightUseSpec.apply`` is linear in the
  weight), mapped back onto the layer's own parameter tree by replaying the
  layer with a ``use`` that returns ``apply(saved input, w)``; only those
  products reach W's outputs, so the rest of the replayed layer is dead code
  the compiler drops: no forward, no input-gradient chain.

Why the hook and not the stage's VJP residuals: ``jax.vjp`` gives one
pullback, and the weight cotangent of a layer's early matmul is the product
of its input with the output cotangent there, which only the input-gradient
chain from the stage's output down to that matmul computes. A W from the
residuals alone must redo that whole chain (a second backward: the cost
zero-bubble exists to avoid); the tap's probes hand B's cotangents to W
instead, and the hook is what names where they are. Without the hook the
layers' split tables run unsplit (``StageFunctions``: B whole, W nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from shardlib.parallel.pipeline.actions import StageFunctions
from shardlib.parallel.weight_use import PlainWeightUse, WeightTap, WeightUseSpec

PyTree = Any
Layer = Callable[..., PyTree]
"""layer(layer_params, x) -> x, or with a weight-use table layer(layer_params, x, use) -> x."""


def stacked_stage_functions(
    embed: Callable,
    layer: Layer,
    loss: Callable,
    *,
    weight_uses: Mapping[str, WeightUseSpec] | None = None,
    remat: bool = False,
) -> StageFunctions:
    """The executor's pieces for a model of stacked layers.

    Args:
      embed: ``embed(outer, inputs) -> x``, the first stage's input from one microbatch's inputs.
      layer: one layer, ``layer(layer_params, x) -> x`` with ``layer_params`` one slice of the
        stack (the leaves without their leading layer axis) and ``x`` any pytree of ``[B, ...]``
        arrays; with ``weight_uses``, ``layer(layer_params, x, use)`` applying each weight named
        in the table as ``use(name, input, weight)``, each name at most once per layer.
      loss: ``loss(outer, x, inputs) -> scalar``, the head and this shard's mean loss.
      weight_uses: the table of the layer's weight uses; given, split (zero-bubble) tables run
        B and W apart (the module's docstring), else unsplit.
      remat: rematerialize each layer in the stage's scan (``jax.checkpoint``).
    """
    plain = PlainWeightUse(weight_uses) if weight_uses is not None else None

    def run_layer(p, x):
        return layer(p, x) if plain is None else layer(p, x, plain)

    def stage(chunk, x):
        return _scan(run_layer, chunk, x, remat)

    if weight_uses is None:
        return StageFunctions(embed=embed, stage=stage, loss=loss)
    split = _SplitLayer(layer, weight_uses, remat)
    return StageFunctions(
        embed=embed,
        stage=stage,
        loss=loss,
        tapped_stage=split.tapped_stage,
        weight_grads=split.weight_grads,
        direct_weight_grads=True,
    )


def _scan(fn: Callable, chunk: PyTree, x: PyTree, remat: bool) -> PyTree:
    def body(x, p):
        return fn(p, x), None

    return jax.lax.scan(jax.checkpoint(body) if remat else body, x, chunk)[0]


class _StoppedUse:
    """A use that applies its weight without a gradient (W takes it): what B's taps apply."""

    def __init__(self, uses: Mapping[str, WeightUseSpec]):
        self.uses = uses

    def __call__(self, name, x, w):
        return self.uses[name].apply(x, jax.lax.stop_gradient(w))


class _Replay:
    """A use that ignores its input and applies the weight to the one B saved, recording the product."""

    def __init__(self, uses: Mapping[str, WeightUseSpec], inputs: Mapping[str, jax.Array]):
        self.uses, self.inputs = uses, inputs
        self.outputs: dict[str, jax.Array] = {}

    def __call__(self, name, x, w):
        spec = self.uses[name]
        self.outputs[name] = spec.apply(self.inputs[spec.input], w)
        return self.outputs[name]


class _SplitLayer:
    """A stacked layer's tapped stage (B) and weight gradients (W), from its weight-use hook."""

    def __init__(self, layer: Layer, uses: Mapping[str, WeightUseSpec], remat: bool):
        self.layer, self.uses, self.remat = layer, uses, remat
        self.x_shapes: PyTree | None = None  # the stage input's, from the executor's first trace of B

    def tapped_stage(self, chunk, x, probes):
        """(x after the chunk, each layer's use inputs [n, ...], without probes the outputs [n, ...])."""
        self.x_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)

        def body(x, layer_in):
            p, layer_probes = layer_in
            tap = WeightTap(self.uses, layer_probes, use=_StoppedUse(self.uses))
            y = self.layer(p, x, tap)
            return y, (tap.inputs, tap.outputs)

        body = jax.checkpoint(body) if self.remat else body
        y, (inputs, outputs) = jax.lax.scan(body, x, (chunk, probes))
        return y, inputs, outputs

    def weight_grads(self, chunk, inputs, dys):
        """The chunk's tapped weights' gradients from each use's saved input and output cotangent."""
        if self.x_shapes is None:
            raise ValueError("weight_grads runs after tapped_stage has been traced (the executor traces B first)")
        x_shapes = self.x_shapes

        def one(p, layer_inputs, layer_dys):
            def products(p):  # the layer's other work reaches no output: dead code, dropped
                replay = _Replay(self.uses, layer_inputs)
                self.layer(p, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), x_shapes), replay)
                return {name: replay.outputs[name] for name in layer_dys}

            return jax.vjp(products, p)[1](layer_dys)[0]

        return jax.vmap(one)(chunk, inputs, dys)
