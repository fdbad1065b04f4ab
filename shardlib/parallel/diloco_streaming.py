"""Streaming DiLoCo: the network in fragments synced on staggered steps, and outer steps overlapped.

Streaming DiLoCo (Douillard et al. 2025): the parameters are split into F
fragments (``Fragment``: a contiguous range of the stacked layers, with the
leaves outside the layer stack spread over the lightest fragments), and the
outer steps are staggered: one fragment's after every H/F-th inner step, so
each fragment still syncs every H steps but an outer step's all-reduce moves
P/F, not P (the peak bandwidth over the replica axes falls F-fold; the
average per step is unchanged). ``fragment_update`` takes the fragment: it
reduces only that fragment's slices, and applies the outer optimizer to the
whole tree under a mask, so the anchor, the outer momentum and the replicas
move only inside the fragment and the state keeps one layout for every F
(checkpoints of F = 1 and F > 1 are alike). A compressed pseudo-gradient
(``outer.compression``) reduces each fragment as a segment of its own, with
its own slices of the error-feedback residuals.

Overlap (the paper's tau, ``OuterSettings.overlap``): with tau = 1 the
outer step due after inner step t is not a program of its own; it is folded
into step t+1's (``fragment_pseudo_gradient`` of the parameters the step
starts from, the inner step, then ``apply_fragment``), so the all-reduce
depends on nothing the inner step computes and XLA's scheduler may run it
beside the forward and backward; its result lands after step t+1, where each
replica keeps ``mixing`` (alpha) of its own parameters. Larger tau would need
a collective that outlives the program that starts it, which an SPMD program
cannot express; tau = 1 hides the all-reduce behind one inner step, which is
P/F bytes against a whole step's compute. A checkpoint never holds an outer
step in flight: the step that carries it recomputes it from the saved state.

Pure functions of arrays and small settings, over ``shardlib.parallel.diloco``'s replicas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from shardlib.parallel.diloco import average_moments, replica_mean, take_rows

PyTree = Any
# The same for one fragment: its pieces [R, *rows] in leaf order -> their means (compression.reduce_segment).
FragmentReduce = Callable[[list, dict], tuple[list, dict]]


@dataclasses.dataclass(frozen=True)
class Fragment:
    """The part of every parameter leaf one streaming outer step syncs, leaves in ``jax.tree.leaves`` order.

    rows[i]: ``(start, stop)`` of leaf i's leading (layer) dimension, or None: leaf i is not in it.
    A leaf outside the layer stack is whole in one fragment: ``(0, its leading size)``.
    """

    rows: tuple[tuple[int, int] | None, ...]


def split_fragments(shapes: Sequence[tuple[int, ...]], stacked: Sequence[bool], count: int) -> tuple[Fragment, ...]:
    """``count`` fragments of parameters with leaf ``shapes``: every stacked leaf (``stacked[i]``: its leading
    dimension is the layers) cut into ``count`` equal row ranges, and each other leaf, largest first,
    put whole into the fragment holding the fewest elements so far. Raises ValueError when the layers
    do not divide."""
    layers = {shape[0] for shape, s in zip(shapes, stacked, strict=True) if s}
    if count > 1 and (len(layers) != 1 or next(iter(layers)) % count):
        raise ValueError(f"outer.fragments={count} must divide the stacked layers ({sorted(layers)})")
    n = next(iter(layers)) if layers else 1
    rows: list[list[tuple[int, int] | None]] = [[None] * len(shapes) for _ in range(count)]
    load = [0] * count
    for i, (shape, s) in enumerate(zip(shapes, stacked, strict=True)):
        if s:
            for f in range(count):
                rows[f][i] = (f * n // count, (f + 1) * n // count)
                load[f] += math.prod(shape) // count
    others = sorted((i for i, s in enumerate(stacked) if not s), key=lambda i: -math.prod(shapes[i]))
    for i in others:
        f = load.index(min(load))
        rows[f][i] = (0, shapes[i][0] if shapes[i] else 1)
        load[f] += math.prod(shapes[i])
    return tuple(Fragment(tuple(r)) for r in rows)


def _mask(x: jax.Array, rows: tuple[int, int] | None) -> jax.Array:
    """Boolean, broadcastable against ``x``: True on the leading rows in ``rows`` (all of a scalar)."""
    if rows is None:
        return jnp.zeros((), bool)
    if x.ndim == 0:
        return jnp.ones((), bool)
    index = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    return (index >= rows[0]) & (index < rows[1])


def fragment_pseudo_gradient(
    params_R: PyTree, state: dict, fragment: Fragment, reduce: FragmentReduce | None = None
) -> tuple[PyTree, dict]:
    """The fragment's pseudo-gradient, averaged over the replicas: (delta [*shape] per leaf, zero outside
    the fragment; state with the compressed reduction's new residuals).

    Only the fragment's slices are averaged: the one all-reduce, of the fragment's bytes (``reduce``:
    compressed, with the residuals in ``state["error_feedback"]``).
    """
    anchors, replicas = jax.tree.leaves(state["anchor"]), jax.tree.leaves(params_R)
    inside = [(i, rows) for i, rows in enumerate(fragment.rows) if rows is not None]
    pieces_R = [take_rows(anchors[i], rows, 0)[None] - take_rows(replicas[i], rows, 1) for i, rows in inside]
    if reduce is None:
        means = replica_mean(pieces_R)
    else:
        means, error_feedback = reduce(pieces_R, state["error_feedback"])
        state = {**state, "error_feedback": error_feedback}
    deltas = [jnp.zeros_like(a) for a in anchors]
    for (i, rows), mean in zip(inside, means, strict=True):
        a = anchors[i]
        deltas[i] = mean if a.ndim == 0 else lax.dynamic_update_slice_in_dim(deltas[i], mean, rows[0], 0)
    return jax.tree.unflatten(jax.tree.structure(state["anchor"]), deltas), state


def apply_fragment(
    params_R: PyTree,
    state: dict,
    outer: optax.GradientTransformation,
    fragment: Fragment,
    delta: PyTree,
    mixing: float = 0.0,
    moments: str = "none",
) -> tuple[PyTree, dict]:
    """The outer optimizer's step by ``delta`` inside ``fragment``, nothing outside (the inner AdamW's
    ``moments`` averaged there too, ``diloco.average_moments``).

    It runs on the whole tree (zeros outside), and a mask keeps the anchor, every
    parameter-shaped state leaf (the momentum) and the replicas as they were outside the
    fragment, so the optimizer is optax's own. Inside, every replica becomes
    ``mixing * itself + (1 - mixing) * the new anchor`` (0: the anchor).
    """
    treedef = jax.tree.structure(state["anchor"])
    mask = jax.tree.unflatten(treedef, [_mask(a, r) for a, r in zip(jax.tree.leaves(state["anchor"]), fragment.rows)])
    updates, outer_state = outer.update(delta, state["outer"], state["anchor"])
    updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
    anchor = optax.apply_updates(state["anchor"], updates)
    inner = average_moments(state["inner"], moments, fragment.rows)
    state = {**state, "anchor": anchor, "outer": _inside(outer_state, state["outer"], mask), "inner": inner}

    def land(p_R, a, m):
        new = a[None] if not mixing else (mixing * p_R + (1.0 - mixing) * a[None]).astype(p_R.dtype)
        return jnp.where(m[None], new, p_R)

    return jax.tree.map(land, params_R, anchor, mask), state


def fragment_update(
    params_R: PyTree,
    state: dict,
    outer: optax.GradientTransformation,
    fragment: Fragment,
    reduce: FragmentReduce | None = None,
    mixing: float = 0.0,
    moments: str = "none",
) -> tuple[PyTree, dict]:
    """Streaming DiLoCo's outer step for one ``fragment``: its pseudo-gradient's all-reduce
    (``fragment_pseudo_gradient``), then the outer step inside it (``apply_fragment``)."""
    delta, state = fragment_pseudo_gradient(params_R, state, fragment, reduce)
    return apply_fragment(params_R, state, outer, fragment, delta, mixing, moments)


def _inside(new: PyTree, old: PyTree, mask: PyTree) -> PyTree:
    """``new`` inside the fragment, ``old`` outside, for every state subtree shaped like the parameters
    (optax's momentum trace); other leaves (counts) take ``new``."""
    params_def: Any = jax.tree.structure(mask)  # a PyTreeDef (jaxlib's, which mypy cannot resolve)

    def is_params_like(node) -> bool:
        return jax.tree.structure(node) == params_def

    def keep(new_node, old_node):
        if is_params_like(new_node):
            return jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new_node, old_node, mask)
        return new_node

    return jax.tree.map(keep, new, old, is_leaf=is_params_like)
