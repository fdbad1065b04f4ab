"""A mixture of experts inside pipeline stages: the stage pieces of an MoE transformer (``pipeline_stages``'s).

The executor's stages run inside a ``shard_map`` manual over ``pipe`` and the
token axes (batch axes, ``expert`` among them, and ``seq``), so each stage
holds its own rows and sequence blocks and its slice of the experts
(``moe`` params, ``layers -> pipe`` and ``experts -> expert``). Inside it:

* the dispatch is the per-shard body of the expert all-to-all
  (``shardlib.parallel.experts.dispatch_in_manual_region``): one all-to-all
  out and one back per MoE layer and microbatch, within the stage; under
  ``model.moe.dispatch: dropless``, the dropless one's
  (``shardlib.parallel.dropless_experts.dropless_in_manual_region``);
* the router's load-balancing and z-losses are means over the microbatch's
  tokens on every block (``token_mean_in_manual_region``), as one device
  computes them on the microbatch;
* each stage's share of the objective (its MoE layers' weighted losses over
  the model's MoE layer count) enters the gradients through the activation
  it sends on (``shardlib.models.moe.attach_loss``), and their values are summed into
  the executor's statistics (``StageFunctions.stats``), whence ``metrics``.

A split (zero-bubble) table's B taps every dense weight use and adds a probe
to each MoE weight (``Transformer.run_moe_layers_tapped``): the experts' and
router's gradients are taken in B, with the input gradient, and W adds them
with the dense uses' deferred ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shardlib.models.layers import WEIGHT_USES, BlockWeights, use_weight
from shardlib.models.moe import ExpertDispatch, ExpertWeights, MoEStats, MoEWeights, attach_loss
from shardlib.parallel.dropless_experts import choose_transport, dropless_in_manual_region
from shardlib.parallel.experts import dispatch_in_manual_region, expert_axes, token_mean_in_manual_region
from shardlib.parallel.pipeline.actions import StageFunctions

PyTree = Any
_STATS = ("moe_aux_loss", "moe_z_loss", "moe_dropped")


def moe_weights(moe: dict) -> MoEWeights:
    """The ``moe`` params ({router, gate, up, down}, [M, ...] each) as ``shardlib.models.moe.MoEWeights``."""
    return MoEWeights(moe["router"], ExpertWeights(moe["gate"], moe["up"], moe["down"]))


class MoEStages:
    """The MoE model's stage functions and its metrics from the executor's statistics.

    model: the ``Transformer`` (for its MoE settings); moe_params: its ``moe`` params (abstract:
    shapes only); token_axes: the stages' manual token axes; shard: the step's rules (for the expert axes).
    """

    def __init__(self, model, moe_params: dict, token_axes: tuple[str, ...], mesh: jax.sharding.Mesh, shard):
        self.n_moe, _, n_experts = moe_params["router"].shape  # [M, D, E]
        self.top_k = model.moe_top_k
        self.loss_weights = model.moe_loss_weights
        ep_axes = expert_axes(shard, n_experts) if shard is not None else ()
        self.expert_axes = ep_axes  # own their experts' slices: neither gathered nor reduced over
        ep_size = math.prod(mesh.shape[a] for a in ep_axes)
        if model.moe_dispatch == "dropless":
            transport = choose_transport(mesh.devices.flat[0].platform, model.moe_transport)
            experts: ExpertDispatch = dropless_in_manual_region(token_axes, ep_axes, ep_size, transport)
        else:
            experts = dispatch_in_manual_region(token_axes, ep_axes, ep_size)
        self.model_kwargs = {
            "experts": experts,
            "token_mean": token_mean_in_manual_region(token_axes),
        }

    def objective(self, stats: MoEStats) -> jax.Array:
        """This chunk's share of the extra loss: the model's is the mean over all MoE layers."""
        aux_weight, z_weight = self.loss_weights
        return (aux_weight * jnp.sum(stats.aux_loss) + z_weight * jnp.sum(stats.z_loss)) / self.n_moe

    def functions(self, fns: StageFunctions, merged: Callable, positions: Callable, kwargs: dict) -> StageFunctions:
        """``fns`` with an MoE stage, tapped stage and weight gradients, and the statistics they return."""

        def stage(chunk, x_BxLxD):
            y_BxLxD, stats = merged().run_moe_layers(
                BlockWeights(**chunk["layers"]),
                moe_weights(chunk["moe"]),
                x_BxLxD,
                positions_BxL=positions(x_BxLxD),
                **kwargs,
                **self.model_kwargs,
            )
            sums = dict(zip(_STATS, (jnp.sum(s) for s in stats), strict=True))
            return attach_loss(y_BxLxD, self.objective(stats)), sums

        def tapped_stage(chunk, x_BxLxD, probes):
            y_BxLxD, stats, inputs, outputs = merged().run_moe_layers_tapped(
                BlockWeights(**chunk["layers"]),
                moe_weights(chunk["moe"]),
                x_BxLxD,
                probes,
                positions_BxL=positions(x_BxLxD),
                **kwargs,
                **self.model_kwargs,
            )
            return attach_loss(y_BxLxD, self.objective(stats)), inputs, outputs

        zeros = {name: jnp.zeros((), jnp.float32) for name in _STATS}
        return dataclasses.replace(
            fns, stage=stage, tapped_stage=tapped_stage, weight_grads=moe_chunk_weight_grads, stats=zeros
        )

    def metrics(self, stats: dict, microbatches: int, batch_shape: tuple[int, int]) -> dict[str, jax.Array]:
        """The step's MoE metrics, as the sequential step reports them: the losses' means over the MoE
        layers and microbatches, and the fraction of (token, choice) pairs dropped."""
        batch, length = batch_shape
        layer_steps = self.n_moe * microbatches
        return {
            "moe_aux_loss": stats["moe_aux_loss"] / layer_steps,
            "moe_z_loss": stats["moe_z_loss"] / layer_steps,
            "moe_dropped_fraction": stats["moe_dropped"] / (self.n_moe * batch * length * self.top_k),
        }


def moe_chunk_weight_grads(chunk: dict, inputs: dict, dys: dict) -> dict:
    """The W of an MoE chunk: each dense weight use's gradient from its tap (over its own layers: the
    MLP's skip the MoE layers), and the MoE weights' gradients, which B took already (their probes')."""

    def grad(name, w_NxW, x_Nx___, dy_Nx___):
        def one(w, x, dy):
            return jax.vjp(lambda w_: use_weight(name, x, w_), w)[1](dy)[0]

        return jax.vmap(one)(w_NxW, x_Nx___, dy_Nx___)

    uses = dys["uses"]
    layers = {n: grad(n, w, inputs[WEIGHT_USES[n].input], uses[n]) for n, w in chunk["layers"].items()}
    moe = dys["moe"]
    return {"layers": layers, "moe": {"router": moe.router, **moe.experts._asdict()}}
