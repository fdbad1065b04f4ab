"""An MoE model's layer stack: a scan over groups of period - 1 dense layers and one MoE layer.

``Transformer.run_moe_layers`` and ``run_moe_layers_tapped`` (a backward
split into input and weight gradients) are this scan, without and with a
``WeightTap`` per layer. The dense layers' MLPs are stacked apart from the
MoE layers' router and experts (``shardlib.models.moe.MoEStack``), so each stack is
reshaped into groups: attention and norms [groups, period, ...], dense MLPs
[groups, period - 1, ...], MoE weights [groups, ...].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

from shardlib.models.layers import BlockWeights, ShardFn, WeightTap
from shardlib.models.moe import ExpertDispatch, MoEStats, MoEWeights, TokenMean, moe_mlp
from shardlib.models.remat import rematerialize

_MLP_FIELDS = ("gate_up", "down")  # stacked for the dense layers only


def scan_moe_groups(
    block: Callable,
    weights: BlockWeights,
    moe_weights: MoEWeights,
    x_BxLxD: jax.Array,
    probes: dict | None,
    *,
    positions_BxL: jax.Array,
    shard: ShardFn,
    period: int,
    top_k: int,
    capacity_factor: float,
    remat: str,
    experts: ExpertDispatch | None,
    token_mean: TokenMean,
    unroll: int = 1,
) -> tuple[jax.Array, tuple[MoEStats, dict[str, Any], dict[str, Any]]]:
    """(x_BxLxD after every layer, (the MoE layers' stats [M], the taps' inputs, their outputs)).

    ``block(x, weights, positions, mlp=None, use=...)``: one decoder layer (``Transformer._block``).
    ``unroll``: groups per iteration of the scan over groups (``lax.scan``'s unroll).
    ``probes`` None: weights applied as ``block`` applies them, and no taps ({} inputs and outputs).
    {} or probes ({"uses": {name: [count, ...]}, "moe": MoEWeights [M, ...]}): every layer through a
    ``WeightTap``, the MoE weights with their probe added; the taps' inputs and outputs come back
    stacked by weight use over the layers that use it, in the stored order.
    """
    tapped = probes is not None
    groups = moe_weights.router.shape[0]

    def grouped(name, w):
        if w is None:  # period 1: no dense MLPs
            return None
        return w.reshape(groups, period - (name in _MLP_FIELDS), *w.shape[1:])

    group_weights = BlockWeights(**{n: grouped(n, getattr(weights, n)) for n in BlockWeights._fields})
    # probes is not None when tapped (mypy does not narrow through the alias).
    use_probes = {n: grouped(n, p) for n, p in probes.get("uses", {}).items()} if tapped else {}  # type: ignore[union-attr]
    moe_probes = probes.get("moe") if tapped else None  # type: ignore[union-attr]

    def group_body(x_BxLxD, ws):
        w, mw, up, mp = ws
        if mp is not None:  # the probe's cotangent is the MoE weights' gradient
            mw = jax.tree.map(jnp.add, mw, mp)
        taps = []
        for j in range(period):
            is_moe = j == period - 1
            layer = BlockWeights(
                **{
                    n: None if getattr(w, n) is None or (is_moe and n in _MLP_FIELDS) else getattr(w, n)[j]
                    for n in BlockWeights._fields
                }
            )
            stats = []  # filled by the MoE MLP, in this same trace

            def mlp(h_BxLxD, mw=mw, stats=stats):
                y_BxLxD, layer_stats = moe_mlp(
                    h_BxLxD,
                    mw,
                    top_k=top_k,
                    capacity_factor=capacity_factor,
                    dispatch=experts,
                    token_mean=token_mean,
                )
                stats.append(layer_stats)
                return y_BxLxD

            kwargs = {}
            if tapped:
                layer_probes = {n: p[j] for n, p in up.items() if not (is_moe and n in _MLP_FIELDS)}
                taps.append(WeightTap(layer_probes if up else None))
                kwargs["use"] = taps[-1]
            x_BxLxD = block(x_BxLxD, layer, positions_BxL, mlp=mlp if is_moe else None, **kwargs)
            x_BxLxD = shard(x_BxLxD, ("batch", "length", "embed"))
        return x_BxLxD, (stats[0], *_stack_taps(taps))

    x_BxLxD, (stats, inputs, outputs) = jax.lax.scan(
        rematerialize(group_body, remat), x_BxLxD, (group_weights, moe_weights, use_probes, moe_probes), unroll=unroll
    )
    # [groups, layers of the group, ...] -> [layers, ...], the stored order.
    inputs, outputs = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), (inputs, outputs))
    return x_BxLxD, (stats, inputs, outputs)


def _stack_taps(taps: list[WeightTap]) -> tuple[dict, dict]:
    """One group's taps (a layer each) as (inputs, outputs) stacked over the layers that recorded each name."""
    if not taps:
        return {}, {}
    stacked = []
    for field in ("inputs", "outputs"):
        names = dict.fromkeys(n for tap in taps for n in getattr(tap, field))
        stacked.append(
            {n: jnp.stack([getattr(tap, field)[n] for tap in taps if n in getattr(tap, field)]) for n in names}
        )
    return cast(tuple[dict, dict], tuple(stacked))  # one dict per field: two
