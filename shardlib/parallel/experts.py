"""Expert parallelism for any expert function: tokens travel to their experts' devices with two ``all_to_all``s.

``moe_dispatch`` is what another project's MoE layer calls inside its jitted
step: given the tokens, the router's logits, an expert function and the
experts' weights stacked over a leading [E] dimension, it routes (top-k,
``shardlib.parallel.expert_routing``), runs every (token, choice) pair within
capacity through its expert on the device that holds it, and combines. The
experts' mesh axes are those the rules give the logical ``experts`` axis
(``expert`` in the presets, or the project's own name through
``preset_rules(mesh_axes=...)``). Inside one ``shard_map`` over the mesh:

1. each device scatters its tokens into a capacity-padded buffer
   ``dispatch_ExGxCxD`` (E experts, G local rows, C slots per expert and row);
2. ``all_to_all`` over the expert axes sends expert e's slice to the device
   that holds e; every device then holds ``[E/X, X*G, C, D]``: its own experts'
   tokens from all X expert peers;
3. each device runs ``expert_fn`` on its local experts' weights and those tokens;
4. the reverse ``all_to_all`` brings the outputs home, where they are combined
   per token with the router weights.

The buffers have a fixed size (padded to capacity) because XLA:CPU has no
``ragged_all_to_all``; on the wire each all-to-all moves the whole buffer,
E*G*C*D elements per device (``dispatch_buffer_bytes``), (X-1)/X of it to
other devices. The same axes (``expert`` in the presets) also split the batch
of the non-expert layers, so no device holds idle tokens.

Expert weights enter the ``shard_map`` split over the expert axes on their
leading dim. ``weight_axes`` (logical names per weight) may keep other dims
split, over axes that do not split the tokens (the ``mlp`` dim over ``model``
under tensor parallelism): the tensor peers, which hold the same tokens, each
run ``expert_fn`` on their slices, whose outputs must then be partial sums,
added with one all-reduce of the buffer (and one backward), as a Megatron MLP
does. Every other dim (``embed`` over ``data`` under FSDP) is gathered by XLA
before the experts run.

Called inside a ``shard_map`` already manual over the token axes (a pipeline
stage), ``moe_dispatch`` runs the per-shard body as it is
(``dispatch_in_manual_region``): the expert axes must be manual there too.

Without capacity, nothing dropped: ``shardlib.parallel.dropless_experts``
(``dropless_moe_dispatch``), which shares this module's context and weight placement.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.core.paths import is_logical_axes
from shardlib.core.rules import LogicalAxes, axes_tuple, logical_to_spec, rule_axes, spec_axes
from shardlib.core.sharding import ActivationSharding
from shardlib.parallel.expert_routing import (
    ExpertDispatch,
    ExpertFn,
    MoEStats,
    PyTree,
    TokenMean,
    capacity,
    check_top_k,
    local_dispatch,
    mean_over_tokens,
    route_and_dispatch,
    run_on_buffer,
    stacked_experts,
    through_experts,
)


def moe_dispatch(
    x_BxLxD: jax.Array,
    router_logits_BxLxE: jax.Array,
    expert_fn: ExpertFn,
    expert_weights: PyTree,
    *,
    top_k: int,
    capacity_factor: float,
    shard: ActivationSharding | None = None,
    weight_axes: PyTree = None,
) -> tuple[jax.Array, MoEStats]:
    """One mixture-of-experts layer, experts on their devices: (y_BxLxD in x's dtype, ``MoEStats``).

    Args:
      x_BxLxD: the layer's (normalised) tokens, sharded as ("batch", "length", "embed").
      router_logits_BxLxE: the router's logits (taken in float32), sharded like the tokens.
      expert_fn: ``expert_fn(expert_weights_local, x_ExNxD) -> y_ExNxD``, every expert
        on its own tokens (the capacity slots, zero where empty), in x's dtype.
      expert_weights: any pytree whose leaves stack every expert's weights over a
        leading [E] dim, split over the ``experts`` axes (``expert_fn`` sees [E/X, ...]).
      top_k, capacity_factor: see ``shardlib.parallel.expert_routing``.
      shard: the rules and mesh (``ActivationSharding``); None runs every expert here.
      weight_axes: logical axes per leaf of ``expert_weights`` (``experts`` first), for
        dims that stay split inside (module docstring); None: only the experts dim.
    Returns:
      y_BxLxD, and the layer's aux_loss, z_loss (means over the batch's tokens)
      and dropped pairs (whole batch): add the weighted losses to the objective.
    Raises:
      ValueError: top_k outside [1, E]; weights not stacked over E; E not a
        multiple of the expert axes; inside a shard_map, expert axes not manual.
    """
    n_experts = router_logits_BxLxE.shape[-1]
    check_top_k(top_k, n_experts)
    dispatch, token_mean, local_experts = _dispatch_for_context(shard, n_experts)
    check_weights_stack(stacked_experts(expert_weights), n_experts, local_experts)
    return route_and_dispatch(
        x_BxLxD,
        router_logits_BxLxE,
        expert_fn,
        expert_weights,
        top_k=top_k,
        capacity_factor=capacity_factor,
        dispatch=dispatch,
        token_mean=token_mean,
        weight_axes=weight_axes,
    )


class DispatchContext(NamedTuple):
    """Where an MoE layer is traced: ``manual`` (inside a ``shard_map`` manual over ``token_axes``, the
    batch and sequence axes there) or not, and its experts' mesh axes ``ep_axes`` (``ep_size`` devices)."""

    manual: bool
    token_axes: tuple[str, ...]
    ep_axes: tuple[str, ...]
    ep_size: int


def dispatch_context(shard: ActivationSharding, n_experts: int) -> DispatchContext:
    """The ``DispatchContext`` where ``moe_dispatch`` (or its dropless sibling) is traced; refuses expert
    axes that are not manual inside a ``shard_map`` manual over others."""
    ep_axes = expert_axes(shard, n_experts)
    ep_size = experts_split_size(shard.mesh, ep_axes, n_experts)
    context = jax.sharding.get_abstract_mesh()
    manual = (
        set() if context.empty else {a for a, t in zip(context.axis_names, context.axis_types) if t == AxisType.Manual}
    )
    if not manual:
        return DispatchContext(False, (), ep_axes, ep_size)
    missing = [a for a in ep_axes if a not in manual]
    if missing:
        raise ValueError(
            f"moe_dispatch inside a shard_map manual over {sorted(manual)}: the experts' mesh axes "
            f"{missing} must be manual there too (add them to axis_names), or call it outside the shard_map"
        )
    # Size-1 axes too: a value the caller made varying over one must be reduced over it to come out invariant.
    token_axes = tuple(a for a in rule_axes(shard.rules, "batch") + rule_axes(shard.rules, "length") if a in manual)
    return DispatchContext(True, token_axes, ep_axes, ep_size)


class DispatchLayout(NamedTuple):
    """How a dispatch over the whole mesh shards its operands (``place_dispatch``).

    x_spec: the tokens' [B, L, D] spec; route_spec: the router's [B, L, R] choices and weights';
    token_axes: the mesh axes of B and L; ep_axes, ep_size: the experts' axes and their size;
    w_specs: the expert weights' specs; tensor_axes: the axes that split their matmuls (``model``).
    """

    x_spec: P
    route_spec: P
    token_axes: tuple[str, ...]
    ep_axes: tuple[str, ...]
    ep_size: int
    w_specs: PyTree
    tensor_axes: tuple[str, ...]


def place_dispatch(
    shard: ActivationSharding,
    x_BxLxD: jax.Array,
    expert_BxLxR: jax.Array,
    weight_BxLxR: jax.Array,
    expert_weights: PyTree,
    weight_axes: PyTree = None,
) -> tuple[DispatchLayout, tuple[jax.Array, jax.Array, jax.Array, PyTree]]:
    """The ``DispatchLayout`` of a dispatch over ``shard``'s mesh, and its operands placed on it:
    (layout, (x, experts, weights, expert_weights)). The expert weights are gathered over everything
    their specs leave out (the ``embed`` dim under FSDP) before the ``shard_map`` goes manual; under
    explicit mesh axes the tokens and routes are resharded to their specs too."""
    mesh = shard.mesh
    n_experts = stacked_experts(expert_weights)
    x_spec = shard.spec(x_BxLxD.shape, ("batch", "length", "embed"))
    route_spec = P(x_spec[0], x_spec[1], None)
    token_axes = axes_tuple(x_spec[0]) + axes_tuple(x_spec[1])
    ep_axes = expert_axes(shard, n_experts)
    ep_size = experts_split_size(mesh, ep_axes, n_experts)
    w_specs, tensor_axes = expert_weight_specs(shard, expert_weights, weight_axes, token_axes)
    expert_weights = jax.tree.map(lambda w, s: place_on_mesh(w, mesh, s), expert_weights, w_specs)
    if AxisType.Explicit in tuple(mesh.axis_types):
        x_BxLxD = place_on_mesh(x_BxLxD, mesh, x_spec)
        expert_BxLxR, weight_BxLxR = (place_on_mesh(a, mesh, route_spec) for a in (expert_BxLxR, weight_BxLxR))
    layout = DispatchLayout(x_spec, route_spec, token_axes, ep_axes, ep_size, w_specs, tensor_axes)
    return layout, (x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights)


def check_weights_stack(stacked: int, n_experts: int, local_experts: int) -> None:
    """Refuses expert weights that do not stack the experts a caller holds (``local_experts`` of
    ``n_experts``), with the hint for a pipeline's executor."""
    if stacked == local_experts:
        return
    held = f" (this device holds {local_experts})" if local_experts != n_experts else ""
    hint = (
        "; inside a shard_map the expert_weights must be this device's experts (split over the expert "
        "axes: a pipeline's executor keeps them split when given owned_axes=expert_axes(...))"
        if stacked == n_experts and local_experts != n_experts
        else ""
    )
    raise ValueError(
        f"expert_weights stack {stacked} experts on their leading dim, but the router's logits have "
        f"{n_experts} experts{held}{hint}"
    )


def _dispatch_for_context(shard: ActivationSharding | None, n_experts: int) -> tuple[ExpertDispatch, TokenMean, int]:
    """(dispatch, token mean, experts whose weights a caller holds) where ``moe_dispatch`` is traced."""
    if shard is None:
        return local_dispatch, mean_over_tokens, n_experts
    where = dispatch_context(shard, n_experts)
    if not where.manual:
        return expert_dispatch(shard), mean_over_tokens, n_experts
    return (
        dispatch_in_manual_region(where.token_axes, where.ep_axes, where.ep_size),
        token_mean_in_manual_region(where.token_axes),
        n_experts // where.ep_size,
    )


def expert_axes(shard: ActivationSharding, n_experts: int) -> tuple[str, ...]:
    """Mesh axes the ``experts`` dimension is split over (size-1 axes dropped), from the rules."""
    return axes_tuple(shard.spec((n_experts,), ("experts",))[0])


def experts_split_size(mesh: jax.sharding.Mesh, ep_axes: tuple[str, ...], n_experts: int) -> int:
    """The number of expert shards; refuses an expert count that does not split over them."""
    ep_size: int = math.prod(mesh.shape[a] for a in ep_axes)
    if n_experts % ep_size:
        where = " x ".join(f"{a}={mesh.shape[a]}" for a in ep_axes)
        raise ValueError(f"{n_experts} experts do not divide over the expert mesh axes {where} ({ep_size} devices)")
    return ep_size


def check_experts_divide(n_experts: int, mesh: jax.sharding.Mesh) -> None:
    """Refuses an expert count that does not split over the mesh's ``expert`` axis, naming both."""
    experts = mesh.shape.get("expert", 1)
    if n_experts % experts:
        raise ValueError(
            f"model.moe.n_experts={n_experts} does not divide over the mesh's expert axis ({experts} devices)"
        )


def expert_dispatch(shard: ActivationSharding) -> ExpertDispatch:
    """The ``ExpertDispatch`` over ``shard``'s mesh and rules (see ``expert_parallel_dispatch``)."""
    return functools.partial(expert_parallel_dispatch, shard)


def dispatch_buffer_bytes(
    rows_per_device: int, tokens_per_row: int, n_experts: int, top_k: int, capacity_factor: float, itemsize: int, d: int
) -> int:
    """Bytes of one device's dispatch buffer [E, G, C, D]: what each of the layer's two forward all-to-alls moves."""
    cap = capacity(tokens_per_row, n_experts, top_k, capacity_factor)
    return n_experts * rows_per_device * cap * d * itemsize


def expert_weight_specs(
    shard: ActivationSharding, expert_weights: PyTree, weight_axes: PyTree, token_axes: tuple[str, ...]
) -> tuple[PyTree, tuple[str, ...]]:
    """(a PartitionSpec per weight, the tensor axes they keep): the experts dim over its axes, any other
    dim ``weight_axes`` names over its mesh axes unless those also split the tokens."""
    if weight_axes is None:
        weight_axes = jax.tree.map(lambda w: ("experts",) + (None,) * (w.ndim - 1), expert_weights)
    leaves_axes = jax.tree.leaves(weight_axes, is_leaf=is_logical_axes)
    weights_def: Any = jax.tree.structure(expert_weights)  # a PyTreeDef (jaxlib's, which mypy cannot resolve)
    if weights_def != jax.tree.structure(weight_axes, is_leaf=is_logical_axes) or not all(
        map(is_logical_axes, leaves_axes)
    ):
        raise ValueError("weight_axes must have expert_weights' structure, a tuple of logical names per leaf")

    def spec(path: tuple[Any, ...], axes: LogicalAxes, w: jax.Array) -> P:
        where = f"expert_weights{jax.tree_util.keystr(path)}"
        full = logical_to_spec(("experts", *axes[1:]), shard.rules, shard.mesh, shape=w.shape, path=where)
        kept = [None if set(axes_tuple(e)) & set(token_axes) else e for e in full[1:]]
        return P(full[0], *kept)

    specs = jax.tree_util.tree_map_with_path(spec, weight_axes, expert_weights, is_leaf=is_logical_axes)
    tensor_axes = tuple(
        dict.fromkeys(a for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)) for a in spec_axes(s[1:]))
    )
    return specs, tensor_axes


def place_on_mesh(x: jax.Array, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
    sharding = NamedSharding(mesh, spec)
    if AxisType.Explicit in tuple(mesh.axis_types):
        resharded: jax.Array = jax.sharding.reshard(x, sharding)
        return resharded
    constrained: jax.Array = jax.lax.with_sharding_constraint(x, sharding)
    return constrained


def expert_parallel_dispatch(
    shard: ActivationSharding,
    x_BxLxD: jax.Array,
    expert_BxLxR: jax.Array,
    weight_BxLxR: jax.Array,
    expert_fn: ExpertFn,
    expert_weights: PyTree,
    *,
    capacity_factor: float,
    weight_axes: PyTree = None,
) -> tuple[jax.Array, jax.Array]:
    """The ``ExpertDispatch`` over the mesh of ``shard`` (an ``ActivationSharding``), in a jitted program.

    Args:
      x_BxLxD: normalised tokens, sharded as ("batch", "length", "embed").
      expert_BxLxR, weight_BxLxR: the router's choices and combine weights, sharded like the tokens.
      expert_fn, expert_weights, weight_axes: as ``moe_dispatch`` takes them ([E, ...] weights).
    Returns:
      y_BxLxD sharded like x, and the number of dropped (token, choice) pairs
      of the whole batch (replicated float32 scalar).
    """
    n_experts = stacked_experts(expert_weights)
    layout, (x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights) = place_dispatch(
        shard, x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights, weight_axes
    )
    x_spec, route_spec, token_axes, ep_axes, ep_size, w_specs, tensor_axes = layout
    ep_name = ep_axes[0] if len(ep_axes) == 1 else ep_axes

    def body(
        x_GxTxD: jax.Array, expert_GxTxR: jax.Array, weight_GxTxR: jax.Array, weights: PyTree
    ) -> tuple[jax.Array, jax.Array]:
        def run_experts(dispatch_ExGxCxD: jax.Array) -> jax.Array:
            local_ExXGxCxD = dispatch_ExGxCxD
            if ep_size > 1:
                # Split the expert dim over the peers, stack what arrives along the row dim.
                local_ExXGxCxD = jax.lax.all_to_all(local_ExXGxCxD, ep_name, split_axis=0, concat_axis=1, tiled=True)
            if tensor_axes:
                # Varying over the tensor axes from here: the backward pass then sums the
                # input gradients of the split weights locally before one all-reduce.
                local_ExXGxCxD = jax.lax.pcast(local_ExXGxCxD, tensor_axes, to="varying")
            out_ExXGxCxD = run_on_buffer(expert_fn, weights, local_ExXGxCxD)
            if tensor_axes:  # each tensor peer returned its partial sum
                out_ExXGxCxD = jax.lax.psum(out_ExXGxCxD, tensor_axes)
            if ep_size > 1:
                back_ExGxCxD: jax.Array = jax.lax.all_to_all(
                    out_ExXGxCxD, ep_name, split_axis=1, concat_axis=0, tiled=True
                )
                return back_ExGxCxD
            return out_ExXGxCxD

        y_GxTxD, dropped = through_experts(x_GxTxD, expert_GxTxR, weight_GxTxR, n_experts, capacity_factor, run_experts)
        if token_axes:
            dropped = jax.lax.psum(dropped, token_axes)
        return y_GxTxD, dropped

    run = jax.shard_map(
        body,
        mesh=shard.mesh,
        in_specs=(x_spec, route_spec, route_spec, w_specs),
        out_specs=(x_spec, P()),
    )
    y_BxLxD, dropped = run(x_BxLxD, expert_BxLxR, weight_BxLxR, expert_weights)
    return y_BxLxD, dropped


def dispatch_in_manual_region(token_axes: tuple[str, ...], ep_axes: tuple[str, ...], ep_size: int) -> ExpertDispatch:
    """The ``ExpertDispatch`` for code already inside a ``shard_map`` manual over ``token_axes`` (the batch
    and sequence axes, ``ep_axes``, of ``ep_size`` devices, among them): the per-shard body of
    ``expert_parallel_dispatch``, run as is.

    Each device holds its own rows and sequence blocks, and its experts' weights
    ([E/X, ...], split over the manual ``ep_axes``): its tokens' capacity groups
    go out with one ``all_to_all`` and come back with another, as in
    ``expert_parallel_dispatch``. Other mesh axes stay automatic: XLA partitions
    the experts over them itself (``weight_axes`` is not needed). ``dropped`` is
    summed over the token axes.
    """
    ep_name = ep_axes[0] if len(ep_axes) == 1 else ep_axes

    def dispatch(
        x_GxTxD: jax.Array,
        expert_GxTxR: jax.Array,
        weight_GxTxR: jax.Array,
        expert_fn: ExpertFn,
        expert_weights: PyTree,
        *,
        capacity_factor: float,
        weight_axes: PyTree = None,
    ) -> tuple[jax.Array, jax.Array]:
        del weight_axes
        n_experts = stacked_experts(expert_weights) * ep_size

        def run_experts(dispatch_ExGxCxD: jax.Array) -> jax.Array:
            if not ep_axes:
                return run_on_buffer(expert_fn, expert_weights, dispatch_ExGxCxD)
            local_ExXGxCxD = jax.lax.all_to_all(dispatch_ExGxCxD, ep_name, split_axis=0, concat_axis=1, tiled=True)
            out_ExXGxCxD = run_on_buffer(expert_fn, expert_weights, local_ExXGxCxD)
            back_ExGxCxD: jax.Array = jax.lax.all_to_all(out_ExXGxCxD, ep_name, split_axis=1, concat_axis=0, tiled=True)
            return back_ExGxCxD

        y_GxTxD, dropped = through_experts(x_GxTxD, expert_GxTxR, weight_GxTxR, n_experts, capacity_factor, run_experts)
        return y_GxTxD, jax.lax.psum(dropped, token_axes) if token_axes else dropped

    return dispatch


def token_mean_in_manual_region(token_axes: tuple[str, ...]) -> TokenMean:
    """The ``TokenMean`` inside a ``shard_map`` manual over ``token_axes``: every block holds as many
    tokens, so the batch's mean is the mean of the blocks' means (the same value on every block)."""

    def mean(x_BxLx___: jax.Array) -> jax.Array:
        local = jnp.mean(x_BxLx___, axis=(0, 1))
        return jax.lax.pmean(local, token_axes) if token_axes else local

    return mean
