"""Remat policies: which intermediates a rematerialised layer keeps, and the one place remat is applied."""

from __future__ import annotations

import jax

# The forward primitive of cuDNN's fused attention (``jax.nn.dot_product_attention`` on GPUs, through
# jax._src.cudnn): its outputs, the attention output and the softmax statistics, are the residuals its
# custom_vjp backward reads. No name or dot policy covers them, so under "full" and "save_matmuls" the
# backward runs the flash forward once more per layer.
FUSED_ATTENTION_FORWARD = "dot_product_attention_fwd"


def fused_attention_outputs_saveable(prim, *_, **__) -> bool:
    """A remat policy: save what cuDNN's fused attention forward returns (any primitive of that name)."""
    return prim.name.startswith(FUSED_ATTENTION_FORWARD)


# Which intermediates a rematerialised layer keeps for the backward pass.
# "save_matmuls" keeps the outputs of dots with no batch dimensions, i.e. the
# weight projections (qkv, o, gate_up, down: O(B*L*D) or O(B*L*F) each), while
# the attention einsums carry batch dims (b, n) and so are recomputed: their
# [B, N, G, L, M] scores are the quadratic-in-length tensors we most want to
# drop. `checkpoint_dots` would save those too, defeating the point.
# "save_matmuls_attention" also keeps cuDNN's fused attention outputs ([B, L, H, K] and [B, H, L]
# statistics per layer, the size of one projection), so its backward does not rerun the flash
# forward; with any other attention it is "save_matmuls".
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_matmuls_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, fused_attention_outputs_saveable
    ),
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def rematerialize(body, remat: str):
    """``body`` under the named remat policy (``none``: unchanged): the one place remat is applied.

    prevent_cse guards against XLA merging recomputation with the forward
    pass; inside scan that cannot happen, and the guard only costs
    performance (per the jax.checkpoint docs).
    """
    if remat not in REMAT_CHOICES:
        raise ValueError(f"unknown remat {remat!r}; expected one of {', '.join(REMAT_CHOICES)}")
    if remat == "none":
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
