"""A stage's backward without recomputation: the forward's VJP residuals, kept from F to B.

By default every backward of the executor recomputes its chunk's forward
from the saved stage input (a third more matmul work, and the chunk's
residuals only while its backward runs). With ``PipelineSettings.recompute``
off, the F runs ``jax.vjp`` instead and keeps the pullback's residuals in a
buffer slot until its B, which only applies the pullback: the plain model's
work, and the plain model's activation memory per microbatch in flight.

A pullback (``jax.vjp``'s second output) is a pytree whose leaves are its
residuals. Some of them are the primals themselves (the weights a matmul's
input gradient needs, and the stage input): those are not stored, the B
has them already, so a slot holds only what the forward computed.
``ResidualLayout`` records, once from an abstract trace, which leaves are
which, and the static pytree structure the B rebuilds the pullback with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ResidualLayout:
    """How a pullback's leaves map to storage.

    treedef: the pullback's pytree structure (the same for every chunk and microbatch).
    sources: per leaf, the index of the primal leaf it is (not stored), or None (stored).
    stored: the shapes and dtypes of the stored leaves, in order.
    has_aux: the function returns (output, statistics); only the output is differentiated.
    """

    treedef: Any
    sources: tuple[int | None, ...]
    stored: tuple[jax.ShapeDtypeStruct, ...]
    has_aux: bool = False


def _sources(pull, primals) -> tuple[list, tuple[int | None, ...], Any]:
    leaves, treedef = jax.tree.flatten(pull)
    by_id = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(primals))}
    return leaves, tuple(by_id.get(id(leaf)) for leaf in leaves), treedef


def residual_layout(fn: Callable, *primals, has_aux: bool = False) -> ResidualLayout:
    """The layout of ``jax.vjp(fn, *primals, has_aux=has_aux)``'s residuals, from an abstract trace (no compute)."""
    found = {}

    def run(*primals):
        y, pull, *_ = jax.vjp(fn, *primals, has_aux=has_aux)
        leaves, sources, treedef = _sources(pull, primals)
        stored = tuple(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf, s in zip(leaves, sources) if s is None)
        found["layout"] = ResidualLayout(treedef, sources, stored, has_aux)
        return y

    jax.eval_shape(run, *primals)
    return found["layout"]


def forward_keeping(layout: ResidualLayout, fn: Callable, *primals) -> tuple[Any, tuple[jax.Array, ...]]:
    """(fn(*primals), the residuals to store): what an F runs."""
    # has_aux is known at run time only; jax.vjp's overloads take a literal True or False.
    y, pull, *aux = jax.vjp(fn, *primals, has_aux=layout.has_aux)  # type: ignore[call-overload]
    y = (y, aux[0]) if layout.has_aux else y
    leaves, sources, _ = _sources(pull, primals)
    if sources != layout.sources:
        raise ValueError(
            "the stage's VJP residuals changed structure between traces; run the pipeline with pipeline.recompute=true"
        )
    return y, tuple(leaf for leaf, s in zip(leaves, sources) if s is None)


def pullback(layout: ResidualLayout, stored: tuple[jax.Array, ...], *primals) -> Callable:
    """The F's pullback, rebuilt from its stored residuals and the primals (the same values the F had)."""
    primal_leaves = jax.tree.leaves(primals)
    kept = iter(stored)
    leaves = [next(kept) if s is None else primal_leaves[s] for s in layout.sources]
    return jax.tree.unflatten(layout.treedef, leaves)
