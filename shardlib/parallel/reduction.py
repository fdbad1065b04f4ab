"""Weight gradients reduced by construction: one reduce-scatter (FSDP) or one all-reduce per weight use.

Left to the partitioner, a weight gradient whose contraction runs over the
token axes (the batch and sequence axes) is an all-reduce, then a slice when
the weight is sharded (FSDP): XLA:GPU's ReduceScatterCreator turns the pair
into a reduce-scatter, XLA:CPU does not, so FSDP moves 2(N-1)/N of the
gradients where (N-1)/N suffices. With tokens over ``data`` and ``seq``, the
partitioner also reduces over each axis separately: two all-reduces of the
whole gradient where one over both axes does.

``ReducedWeightUse`` is a ``shardlib.parallel.weight_use.WeightUse`` whose backward pass
takes the weight gradient itself. The forward pass and the input gradient
stay with the partitioner (the FSDP gathers too, so XLA keeps its freedom to
schedule and overlap them with compute); only the weight-gradient
contraction runs inside a ``shard_map`` over the token axes, on each device's
own tokens, and its partial sum leaves through ``reduce_gradient``:
``psum_scatter`` over the axes the weight is sharded over, then one ``psum``
of the shard over the other token axes (HSDP's across-host all-reduce is
such a psum). A custom VJP per use rather than one ``shard_map`` around the
whole model keeps every other strategy (tensor parallelism over ``model``,
ring attention over ``seq``, the experts' all-to-all) exactly as it is: they
never see a manual axis.

Why not explicit sharding mode (``AxisType.Explicit`` with ``reshard``)? It
states the gradient's output sharding, not the collective: XLA:CPU still
emits the all-reduce and the slice.

The pipeline's executor, which makes the token axes manual for a whole step,
gathers and reduces with the same two functions (``gather_sharded``,
``reduce_gradient``).

Public entry points, for any model (the project's own train step uses them too):

* ``reduced_weight_use(shard, uses, weight_specs, ...)``: the ``WeightUse`` for a
  table of uses, its token axes read from the rules (``batch``, ``length``);
* ``use_specs(param_specs, weight_params, stacked=...)``: each use's weight spec
  from the parameters' specs, a stacked weight's without its layer dimension;
* ``reduce_deferred_params(grads, param_specs, paths, use)``: ``reduce_deferred`` on
  the gradient leaves a deferred use left partial, once per step;
* ``shardlib.parallel.reduced_dense``: the same for a Linen model's ``nn.Dense``,
  ``nn.DenseGeneral`` and ``nn.Embed`` through ``nn.intercept_methods``, no
  change to the model's code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from shardlib.core.rules import Rules, axes_tuple, rule_axes
from shardlib.parallel.sharded_lookup import make_sharded_lookup, token_group
from shardlib.parallel.spec_parts import automatic_part, manual_part
from shardlib.parallel.weight_use import PlainWeightUse, WeightUse, WeightUseSpec

Apply = Callable[[jax.Array, jax.Array], jax.Array]
# _rows_lookup: a lookup on a block of the table's rows, its ids paired with the block's first row.
RowsLookup = Callable[[tuple[jax.Array, jax.Array | int], jax.Array], jax.Array]


def gather_sharded(w: jax.Array, spec: P, axes: Sequence[str]) -> jax.Array:
    """Inside a ``shard_map`` manual over ``axes``: the parameter whole along every dimension ``spec`` splits over them."""
    for dim, entry in enumerate(spec):
        split = tuple(a for a in axes_tuple(entry) if a in axes)
        if split:
            w = jax.lax.all_gather(w, split, axis=dim, tiled=True)
    return w


def reduce_gradient(
    g: jax.Array, spec: P, axes: Sequence[str], *, deferred: bool = False, dtype: DTypeLike | None = None
) -> jax.Array:
    """Inside a ``shard_map`` manual over ``axes``: the sum of every device's ``g``, sharded as ``spec`` says.

    A reduce-scatter over the axes ``spec`` splits a dimension over, then one
    all-reduce over the remaining ``axes`` of what is left (a shard, so the
    slow axis moves the least). ``deferred``: the all-reduce is left out, for
    ``reduce_deferred`` once the caller has summed every microbatch's shards.
    ``dtype``: what the collectives carry (the result is cast back to ``g``'s
    dtype); None: ``g``'s own.
    """
    out_dtype = g.dtype
    if dtype is not None:
        g = g.astype(dtype)
    summed: set[str] = set()
    for dim, entry in enumerate(spec):
        split = tuple(a for a in axes_tuple(entry) if a in axes)
        if split:
            g = jax.lax.psum_scatter(g, split, scatter_dimension=dim, tiled=True)
            summed.update(split)
    rest = tuple(a for a in axes if a not in summed)
    if rest and not deferred:
        g = jax.lax.psum(g, rest)
    return g.astype(out_dtype)


def unreduced_axes(spec: P, axes: Sequence[str]) -> tuple[str, ...]:
    """The token ``axes`` a gradient sharded as ``spec`` is all-reduced over (those ``spec`` does not split)."""
    split = {a for entry in spec for a in axes_tuple(entry)}
    return tuple(a for a in axes if a not in split)


def reduce_deferred(
    g: jax.Array, spec: P, mesh: jax.sharding.Mesh, token_axes: Sequence[str], *, dtype: DTypeLike | None = None
) -> jax.Array:
    """The all-reduce ``reduce_gradient(..., deferred=True)`` left out, of a sum of such partial gradients.

    ``g``: [w's shape] sharded as ``spec``, typed as replicated over the
    ``unreduced_axes`` but holding each device's own partial sum there (what
    ``ReducedWeightUse(deferred=True)`` returns, summed over microbatches with
    elementwise adds only: nothing between may move it across devices).
    Returns the true sum over those axes, one all-reduce, carried in ``dtype``.
    """
    rest = unreduced_axes(spec, [a for a in token_axes if mesh.shape[a] > 1])
    if not rest:
        return g
    own = tuple(a for entry in spec for a in axes_tuple(entry) if mesh.shape[a] > 1)
    manual = tuple(dict.fromkeys((*rest, *own)))
    local_spec = manual_part(spec, manual)

    def local(g_l: jax.Array) -> jax.Array:
        out: jax.Array = jax.lax.psum(g_l if dtype is None else g_l.astype(dtype), rest)
        return out.astype(g_l.dtype)

    reduced: jax.Array = jax.shard_map(
        local, mesh=mesh, in_specs=local_spec, out_specs=local_spec, axis_names=set(manual), check_vma=False
    )(g)
    return reduced


def lookup_gathers_table(vocab: int, tokens_per_device: int) -> bool:
    """Whether an embedding table sharded over N devices (FSDP) is best gathered for its lookup.

    Gathering the [V, D] table and reduce-scattering its gradient moves
    2(N-1)/N of V·D; the other way, each device's token ids gathered over the
    group and the looked-up rows (1/N of each) all-to-all'd to their tokens
    and their gradients back, 2(N-1)/N of T·D for T tokens per device, plus
    the ids. The table is the cheaper one when it has no more rows than a
    device has tokens.
    """
    return vocab <= tokens_per_device


class ReducedWeightUse:
    """A ``WeightUse`` (``use(name, x, w) -> y``) whose weight gradients are reduced by ``reduce_gradient``.

    Args:
      mesh: the step's mesh (Auto axes).
      uses: weight name -> its ``shardlib.parallel.weight_use.WeightUseSpec``: ``apply(x, w)``,
        linear in ``w``, and the input's and output's logical axes.
      weight_specs: weight name -> the weight's PartitionSpec as the use sees it
        (a stacked layer weight without its leading layer dimension). Names
        not in it are applied as ``uses`` says, with the partitioner's gradient.
      activation_spec: ``(shape, logical axes) -> PartitionSpec`` of an
        activation (the plan's ``ActivationSharding.spec``).
      batch_axes, length_axes: the mesh axes the activations' first dimension
        (rows) and second (positions) are split over.
      lookups: the uses that are table lookups (input: token ids). A table
        sharded over a token axis is gathered for them only where
        ``lookup_gathers_table`` says it is the cheaper way; otherwise the
        token ids travel to the table's shards (``sharded_lookup``).
      deferred: every weight gradient leaves without its all-reduce over the
        token axes the weight is not sharded over (``reduce_gradient``'s
        ``deferred``): typed as replicated there, it holds each device's own
        partial sum, for gradient accumulation to sum over microbatches and
        ``reduce_deferred`` to reduce once per step. Only elementwise adds
        may touch such a gradient before that.
      reduce_dtype: the dtype the gradients' collectives carry (None: the weight's).
      ordered: the uses whose backward gathers the weight for the input gradient only
        after the use's own partial sum is reduced: one full-size buffer less at the
        peak than letting that gather overlap another use's reduction (what lets a GPU
        hide both collectives behind compute), for a platform whose collectives run in
        turn anyway (XLA:CPU). Not for a weight outside a loop, whose forward gather
        XLA keeps for the backward: ordering would gather it twice.

    The forward pass constrains ``w`` to its spec without the token axes (the
    FSDP gather) and applies it; the backward pass gives the input gradient
    by the partitioner and the weight gradient [w's shape, sharded as
    ``weight_specs``] from each device's own blocks, reduced once. That
    ``shard_map`` is manual over the token axes and the weight's own (a
    tensor-parallel weight's ``model``): XLA does not partition a manual
    collective over the automatic axes, and would reduce-scatter the whole
    weight on every ``model`` device. A lookup stays automatic over the
    table's other axes (its ids index the whole vocabulary).
    """

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        uses: Mapping[str, Any],
        weight_specs: Mapping[str, P],
        activation_spec: Callable[[Sequence[int], tuple[str | None, ...]], P],
        batch_axes: Sequence[str],
        length_axes: Sequence[str] = (),
        lookups: Sequence[str] = ("embedding",),
        *,
        deferred: bool = False,
        reduce_dtype: DTypeLike | None = None,
        ordered: Sequence[str] = (),
    ):
        self.mesh = mesh
        self.ordered = frozenset(ordered)
        self.deferred = deferred
        self.reduce_dtype = reduce_dtype
        self.token_axes = tuple(a for a in (*batch_axes, *length_axes) if mesh.shape[a] > 1)
        self.activation_spec = activation_spec
        self.weight_specs = dict(weight_specs)
        self.lookups = tuple(lookups)
        self._plain = {name: spec.apply for name, spec in uses.items()}
        self._input_axes = {name: spec.input_axes for name, spec in uses.items()}
        self._uses = {name: self._reduced(name, uses[name], spec) for name, spec in weight_specs.items()}

    def __call__(self, name: str, x: jax.Array, w: jax.Array) -> jax.Array:
        use = self._uses.get(name)
        if use is None:
            y: jax.Array = self._plain[name](x, w)
            return y
        spec = self.weight_specs[name]
        if len(spec) > w.ndim:
            raise ValueError(
                f"weight use {name!r}: its spec {spec} names {len(spec)} dimensions but the weight is "
                f"{w.ndim}-dimensional {tuple(w.shape)} (a stacked layer weight's spec is given without "
                "its layer dimension: use_specs(..., stacked=...))"
            )
        if name in self.lookups and not self._gathers_table(x, w, name):
            return self._sharded_lookup(name, x)(x, w)
        return use(x, w)

    def _sharded_lookup(self, name: str, ids: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The lookup that moves token ids to the table's shards (``sharded_lookup``), for ids shaped as ``ids``."""
        ids_spec = self.activation_spec(ids.shape, self._input_axes[name])
        lookup: Callable[[jax.Array, jax.Array], jax.Array] = make_sharded_lookup(
            self.mesh,
            self.weight_specs[name],
            ids_spec,
            self.token_axes,
            deferred=self.deferred,
            dtype=self.reduce_dtype,
        )
        return lookup

    def _gathers_table(self, ids: jax.Array, table: jax.Array, name: str) -> bool:
        """Whether a lookup gathers its table: always when the table is whole over the token axes."""
        if not token_group(self.weight_specs[name], self.token_axes):
            return True
        tokens = ids.size // math.prod(self.mesh.shape[a] for a in self.token_axes)
        return lookup_gathers_table(table.shape[0], tokens)

    def _reduced(self, name: str, use_spec: Any, spec: P) -> Callable[[jax.Array, jax.Array], jax.Array]:
        apply: Apply = use_spec.apply
        gathered = NamedSharding(self.mesh, automatic_part(spec, self.token_axes))
        own = tuple(a for e in spec for a in axes_tuple(e) if self.mesh.shape[a] > 1)
        manual = tuple(dict.fromkeys((*self.token_axes, *own)))
        lookup = name in self.lookups

        def whole(w: jax.Array) -> jax.Array:
            constrained: jax.Array = jax.lax.with_sharding_constraint(w, gathered)
            return constrained

        @jax.custom_vjp
        def use(x: jax.Array, w: jax.Array) -> jax.Array:
            return apply(x, whole(w))

        def forward(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            return apply(x, whole(w)), (x, w)

        def backward(residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array | None, jax.Array]:
            x, w = residuals
            x_spec = manual_part(self.activation_spec(x.shape, use_spec.input_axes), manual)
            dy_spec = manual_part(self.activation_spec(dy.shape, use_spec.output_axes), manual)
            use_apply: Apply | RowsLookup = _rows_lookup if lookup else apply
            grad = self._weight_grad(use_apply, x, dy, w, (x_spec, dy_spec, manual_part(spec, manual)), manual)
            dx = None
            if jnp.issubdtype(x.dtype, jnp.inexact):  # token ids (the lookup) have no gradient
                if name in self.ordered:  # the weight gathered for dx only once this use's partial sum is reduced
                    grad, w = jax.lax.optimization_barrier((grad, w))
                dx = jax.vjp(lambda x_: apply(x_, whole(w)), x)[1](dy)[0]
            return dx, grad

        use.defvjp(forward, backward)
        return jax.named_call(use, name=f"use_{name}")

    def _weight_grad(
        self,
        apply: Apply | RowsLookup,
        x: jax.Array,
        dy: jax.Array,
        w: jax.Array,
        specs: tuple[P, P, P],
        manual: tuple[str, ...],
    ) -> jax.Array:
        """[w's shape]: the gradient of ``apply(x, w)`` against ``dy``, reduced over the token axes.

        ``apply`` is the use's own, or ``_rows_lookup`` for a lookup: on a
        block of the table's rows (the vocabulary over ``model``) the token
        ids must be shifted to the block's first row, and the others dropped.
        """
        x_spec, dy_spec, w_spec = specs
        row_axes = tuple(a for a in axes_tuple(w_spec[0] if len(w_spec) else None) if a not in self.token_axes)
        # A device's partial sum covers the whole weight along the token axes (reduce_gradient scatters
        # it) and its own block along the weight's other manual axes.
        block = tuple(
            n // math.prod(self.mesh.shape[a] for a in axes_tuple(entry) if a not in self.token_axes)
            for n, entry in zip(w.shape, (*w_spec, *(None,) * (w.ndim - len(w_spec))))
        )
        partial_struct = jax.ShapeDtypeStruct(block, w.dtype)
        scatter_spec = manual_part(w_spec, self.token_axes)

        def local(x_l: Any, dy_l: jax.Array) -> jax.Array:
            if apply is _rows_lookup:
                first = jax.lax.axis_index(row_axes) * block[0] if row_axes else 0
                x_l = (x_l, first)
            (partial,) = jax.linear_transpose(lambda w_: apply(x_l, w_), partial_struct)(dy_l)
            return reduce_gradient(
                partial, scatter_spec, self.token_axes, deferred=self.deferred, dtype=self.reduce_dtype
            )

        grad: jax.Array = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(x_spec, dy_spec),
            out_specs=w_spec,
            axis_names=set(manual),
            check_vma=False,
        )(x, dy)
        return grad


def token_mesh_axes(rules: Rules, mesh: jax.sharding.Mesh) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the mesh axes the rules split ``batch`` over, those they split ``length`` over), size-1 axes left out."""
    batch, length = (tuple(a for a in rule_axes(rules, name) if mesh.shape[a] > 1) for name in ("batch", "length"))
    return batch, length


def reduced_weight_use(
    shard: Any,
    uses: Mapping[str, WeightUseSpec],
    weight_specs: Mapping[str, P],
    *,
    lookups: Sequence[str] = (),
    deferred: bool = False,
    reduce_dtype: DTypeLike | None = None,
    ordered: Sequence[str] = (),
) -> WeightUse:
    """The ``WeightUse`` any model calls (``use(name, x, w) -> y``) for the minimum-byte gradient reduction.

    Args:
      shard: the activations' sharding (``shardlib.ActivationSharding``: its ``rules``, ``mesh``
        and ``spec(shape, logical_axes)``); the token axes are the mesh axes (size > 1) its
        rules split ``batch`` and ``length`` over.
      uses: every weight use of the model, name -> ``WeightUseSpec`` (``apply(x, w)`` linear in
        ``w``, the input's and output's logical axes).
      weight_specs: name -> the weight's PartitionSpec as the use sees it (a stacked weight's
        without its leading layer dimension: ``use_specs``). Uses not named here keep the
        partitioner's gradient.
      lookups: the uses that are table lookups (input: integer ids, apply: ``take`` along rows).
      deferred, reduce_dtype, ordered: as ``ReducedWeightUse`` takes them.

    Returns a ``ReducedWeightUse``, or the table's ``PlainWeightUse`` when no token axis splits
    anything (one device, or only tensor parallelism: there is nothing to reduce over).
    Raises ValueError naming a weight spec or lookup without a use in ``uses``.
    """
    unknown = sorted(set(weight_specs) - set(uses)) + sorted(set(lookups) - set(uses))
    if unknown:
        raise ValueError(f"weight specs or lookups {unknown} name no use in the table ({sorted(uses)})")
    rows, positions = token_mesh_axes(shard.rules, shard.mesh)
    if not (rows or positions):
        return PlainWeightUse(uses)
    return ReducedWeightUse(
        shard.mesh,
        uses,
        weight_specs,
        shard.spec,
        rows,
        positions,
        lookups,
        deferred=deferred,
        reduce_dtype=reduce_dtype,
        ordered=ordered,
    )


def _spec_of(node: Any) -> P | None:
    """A leaf's PartitionSpec: itself, or a ``NamedSharding``'s; None for anything else (an absent leaf)."""
    if isinstance(node, P):
        return node
    return node.spec if isinstance(node, NamedSharding) else None


def _leaf(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return tree


def use_specs(
    param_specs: Any, weight_params: Mapping[str, Sequence[str]], stacked: Sequence[str] = ()
) -> dict[str, P]:
    """Each use's weight spec (``reduced_weight_use``'s ``weight_specs``) from the parameters' specs.

    ``param_specs``: nested dicts of ``PartitionSpec`` or ``NamedSharding`` (the parameters');
    ``weight_params``: use name -> the path of the parameter it applies; a path whose first key
    is in ``stacked`` (the layers scanned over) is a stacked parameter: the use sees one layer,
    so its spec loses the leading dimension. A path with no leaf (an optional weight) is left out.
    """
    specs = {}
    for name, path in weight_params.items():
        spec = _spec_of(_leaf(param_specs, path))
        if spec is not None:
            specs[name] = P(*tuple(spec)[1:]) if path[0] in stacked else spec
    return specs


def reduce_deferred_params(grads: Any, param_specs: Any, paths: Any, use: ReducedWeightUse) -> Any:
    """``grads`` with each leaf at ``paths`` (partial sums a ``deferred`` use left) reduced once (``reduce_deferred``).

    ``grads``: nested dicts; ``param_specs``: the same tree of ``PartitionSpec`` or ``NamedSharding``
    (each parameter's whole spec, a stacked one's with its layer dimension); ``paths``: the
    parameters ``use`` applies. Branches are copied before a leaf is replaced: ``grads`` is unchanged.
    """
    out = dict(grads)
    for path in paths:
        node = out
        for key in path[:-1]:
            node[key] = dict(node[key])  # copy the branch before replacing its leaf
            node = node[key]
        spec = _spec_of(_leaf(param_specs, path))
        # A path without a spec fails in reduce_deferred as before (paths are the parameters use applies).
        node[path[-1]] = reduce_deferred(
            node[path[-1]],
            spec,  # type: ignore[arg-type]
            use.mesh,
            use.token_axes,
            dtype=use.reduce_dtype,
        )
    return out


def _rows_lookup(ids_and_first: tuple[jax.Array, jax.Array | int], table_block: jax.Array) -> jax.Array:
    """The rows of ``table_block`` (the table's rows from ``first`` on) for the ids it holds, zeros for the rest."""
    ids, first = ids_and_first
    local = ids - first
    held = (local >= 0) & (local < table_block.shape[0])
    rows = jnp.take(table_block, jnp.where(held, local, 0), axis=0)
    return jnp.where(held[..., None], rows, jnp.zeros((), rows.dtype))
