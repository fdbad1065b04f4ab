"""Remat policies: which intermediates a rematerialised layer keeps, and the one place remat is applied."""

from __future__ import annotations

import jax

# Which intermediates a rematerialised layer keeps for the backward pass.
# "save_matmuls" keeps the outputs of dots with no batch dimensions, i.e. the
# weight projections (qkv, o, gate_up, down: O(B*L*D) or O(B*L*F) each), while
# the attention einsums carry batch dims (b, n) and so are recomputed: their
# [B, N, G, L, M] scores are the quadratic-in-length tensors we most want to
# drop. `checkpoint_dots` would save those too, defeating the point.
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *_REMAT_POLICIES)


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
    return jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
