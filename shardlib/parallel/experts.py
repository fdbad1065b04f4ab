"""Expert parallelism: tokens travel to their experts' devices with two ``all_to_all``s.

``expert_dispatch(shard)`` is the mesh-aware ``ExpertDispatch`` of
``shardlib.models.moe``: the parallel plan passes it to the model as an argument, as
it passes the attention function, and the model never names a mesh axis. Inside one ``shard_map`` over every mesh axis:

1. each device scatters its tokens into a capacity-padded buffer
   ``dispatch_ExGxCxD`` (E experts, G local rows, C slots per expert and row);
2. ``all_to_all`` over the expert axes sends expert e's slice to the device
   that holds e; every device then holds ``[E/X, X*G, C, D]``: its own experts'
   tokens from all X expert peers;
3. each device runs its experts (SwiGLU) on those tokens;
4. the reverse ``all_to_all`` brings the outputs home, where they are combined
   per token with the router weights.

The buffers have a fixed size (padded to capacity) because XLA:CPU has no
``ragged_all_to_all``; on the wire each all-to-all moves the whole buffer,
E*G*C*D elements per device (``dispatch_buffer_bytes``), (X-1)/X of it to
other devices. The same axes (``expert`` in the presets) also split the batch
of the non-expert layers, so no device holds idle tokens.

Expert weights enter the ``shard_map`` split over the expert axes and, under
tensor parallelism, their hidden dim over the ``mlp`` axes (``model``): the
tensor peers, which hold the same tokens, each run their slice of every
expert's hidden units and sum the outputs with one all-reduce of the buffer
(and one backward), as a Megatron MLP does. Any other sharding of the weights
(``embed`` over ``data`` under FSDP) is gathered by XLA before the experts run.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.models.moe import ExpertDispatch, ExpertWeights, TokenMean, capacity, expert_ffn, through_experts
from shardlib.core.rules import axes_tuple


def expert_axes(shard, n_experts: int) -> tuple[str, ...]:
    """Mesh axes the ``experts`` dimension is split over (size-1 axes dropped), from the rules."""
    return axes_tuple(shard.spec((n_experts,), ("experts",))[0])


def check_experts_divide(n_experts: int, mesh: jax.sharding.Mesh) -> None:
    """Refuses an expert count that does not split over the mesh's ``expert`` axis, naming both."""
    experts = mesh.shape["expert"]
    if n_experts % experts:
        raise ValueError(
            f"model.moe.n_experts={n_experts} does not divide over the mesh's expert axis ({experts} devices)"
        )


def expert_dispatch(shard) -> ExpertDispatch:
    """The ``shardlib.models.moe.ExpertDispatch`` over ``shard``'s mesh and rules (see ``expert_parallel_dispatch``)."""
    return functools.partial(expert_parallel_dispatch, shard)


def dispatch_buffer_bytes(
    rows_per_device: int, tokens_per_row: int, n_experts: int, top_k: int, capacity_factor: float, itemsize: int, d: int
) -> int:
    """Bytes of one device's dispatch buffer [E, G, C, D]: what each of the layer's two forward all-to-alls moves."""
    cap = capacity(tokens_per_row, n_experts, top_k, capacity_factor)
    return n_experts * rows_per_device * cap * d * itemsize


def expert_parallel_dispatch(
    shard,
    x_BxLxD: jax.Array,
    expert_BxLxR: jax.Array,
    weight_BxLxR: jax.Array,
    experts: ExpertWeights,
    *,
    capacity_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """``shardlib.models.moe.ExpertDispatch`` over the mesh of ``shard`` (an ``ActivationSharding``).

    Args:
      x_BxLxD: normalised tokens, sharded as ("batch", "length", "embed").
      expert_BxLxR, weight_BxLxR: the router's choices and combine weights,
        sharded like the tokens.
      experts: [E, D, F] / [E, F, D] weights, logical ("experts", ...).
    Returns:
      y_BxLxD sharded like x, and the number of dropped (token, choice) pairs
      of the whole batch (replicated float32 scalar).
    """
    mesh = shard.mesh
    n_experts = experts.gate.shape[0]
    x_spec = shard.spec(x_BxLxD.shape, ("batch", "length", "embed"))
    route_spec = P(x_spec[0], x_spec[1], None)
    token_axes = axes_tuple(x_spec[0]) + axes_tuple(x_spec[1])
    ep_axes = expert_axes(shard, n_experts)
    ep_size = math.prod(mesh.shape[a] for a in ep_axes)
    ep_name = ep_axes[0] if len(ep_axes) == 1 else ep_axes
    ep_entry = ep_name if ep_axes else None
    # Tensor parallelism inside the experts: the hidden dim keeps its `mlp` axes
    # (Megatron: column- then row-parallel, one psum of the output), unless
    # those axes also split the tokens, where a psum would mix different tokens.
    mlp_entry = shard.spec(experts.gate.shape, ("experts", "embed", "mlp"))[2]
    tensor_axes = axes_tuple(mlp_entry)
    if set(tensor_axes) & set(token_axes):
        mlp_entry, tensor_axes = None, ()
    w_specs = ExpertWeights(P(ep_entry, None, mlp_entry), P(ep_entry, None, mlp_entry), P(ep_entry, mlp_entry, None))
    # Everything else (the `embed` dim under FSDP) is gathered before going manual.
    experts = jax.tree.map(
        lambda w, spec: jax.lax.with_sharding_constraint(w, NamedSharding(mesh, spec)), experts, w_specs
    )

    def body(x_GxTxD, expert_GxTxR, weight_GxTxR, w: ExpertWeights):
        def run_experts(dispatch_ExGxCxD):
            local_ExXGxCxD = dispatch_ExGxCxD
            if ep_size > 1:
                # Split the expert dim over the peers, stack what arrives along the row dim.
                local_ExXGxCxD = jax.lax.all_to_all(local_ExXGxCxD, ep_name, split_axis=0, concat_axis=1, tiled=True)
            if tensor_axes:
                # Varying over the tensor axes from here: the backward pass then sums the
                # gate and up projections' input gradients locally before one all-reduce.
                local_ExXGxCxD = jax.lax.pcast(local_ExXGxCxD, tensor_axes, to="varying")
            out_ExXGxCxD = expert_ffn(local_ExXGxCxD, w)
            if tensor_axes:  # each tensor peer summed over its slice of the hidden dim
                out_ExXGxCxD = jax.lax.psum(out_ExXGxCxD, tensor_axes)
            if ep_size > 1:
                return jax.lax.all_to_all(out_ExXGxCxD, ep_name, split_axis=1, concat_axis=0, tiled=True)
            return out_ExXGxCxD

        y_GxTxD, dropped = through_experts(x_GxTxD, expert_GxTxR, weight_GxTxR, n_experts, capacity_factor, run_experts)
        if token_axes:
            dropped = jax.lax.psum(dropped, token_axes)
        return y_GxTxD, dropped

    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(x_spec, route_spec, route_spec, w_specs),
        out_specs=(x_spec, P()),
    )
    return run(x_BxLxD, expert_BxLxR, weight_BxLxR, experts)


def dispatch_in_manual_region(token_axes: tuple[str, ...], ep_axes: tuple[str, ...], ep_size: int) -> ExpertDispatch:
    """The ``ExpertDispatch`` for code already inside a ``shard_map`` manual over ``token_axes`` (the batch
    and sequence axes, ``ep_axes``, of ``ep_size`` devices, among them): the per-shard body of
    ``expert_parallel_dispatch``, run as is.

    Each device holds its own rows and sequence blocks, and its experts' weights
    ([E/X, D, F], split over the manual ``ep_axes``): its tokens' capacity groups
    go out with one ``all_to_all`` and come back with another, as in
    ``expert_parallel_dispatch``. Other mesh axes stay automatic: under tensor
    parallelism XLA partitions each expert's hidden units over ``model`` itself
    (one all-reduce of the buffer each way). ``dropped`` is summed over the token axes.
    """
    ep_name = ep_axes[0] if len(ep_axes) == 1 else ep_axes

    def dispatch(x_GxTxD, expert_GxTxR, weight_GxTxR, experts: ExpertWeights, *, capacity_factor: float):
        n_experts = experts.gate.shape[0] * ep_size

        def run_experts(dispatch_ExGxCxD):
            if not ep_axes:
                return expert_ffn(dispatch_ExGxCxD, experts)
            local_ExXGxCxD = jax.lax.all_to_all(dispatch_ExGxCxD, ep_name, split_axis=0, concat_axis=1, tiled=True)
            out_ExXGxCxD = expert_ffn(local_ExXGxCxD, experts)
            return jax.lax.all_to_all(out_ExXGxCxD, ep_name, split_axis=1, concat_axis=0, tiled=True)

        y_GxTxD, dropped = through_experts(x_GxTxD, expert_GxTxR, weight_GxTxR, n_experts, capacity_factor, run_experts)
        return y_GxTxD, jax.lax.psum(dropped, token_axes) if token_axes else dropped

    return dispatch


def token_mean_in_manual_region(token_axes: tuple[str, ...]) -> TokenMean:
    """``shardlib.models.moe.TokenMean`` inside a ``shard_map`` manual over ``token_axes``: every block holds as many
    tokens, so the batch's mean is the mean of the blocks' means (the same value on every block)."""

    def mean(x_BxLx___: jax.Array) -> jax.Array:
        local = jnp.mean(x_BxLx___, axis=(0, 1))
        return jax.lax.pmean(local, token_axes) if token_axes else local

    return mean
