"""Logical axes from Flax's own annotations, with path patterns for what they miss.

Flax models name their parameters' dimensions themselves:

* Linen: ``nn.with_logical_partitioning(init, ("embed", "mlp"))`` (or
  ``nn.with_partitioning``) wraps the parameter in an ``nn.LogicallyPartitioned``
  (``nn.Partitioned``) box whose ``names`` are the axes; ``model.init`` returns
  the boxes, and JAX shows their paths as ``.../kernel/value``;
* NNX: ``nnx.with_partitioning(init, names)``, ``kernel_metadata={"out_sharding":
  names}`` or ``nnx.Param(x, out_sharding=names)`` store the names in the
  variable's ``out_sharding`` metadata (older code: ``sharding_names``, ``sharding``);
* T5X style: ``flax.linen.partitioning.param_with_axes(name, init, axes=names)``
  keeps the parameter plain in ``params`` and the names beside it, in the
  ``params_axes`` collection, as an ``AxisMetadata`` under ``<name>_axes``
  (``variable_with_axes`` does the same for any collection ``c``: ``c_axes``;
  ``scan_with_axes`` adds the scanned axis's name). The names are read when
  the variables hold both collections, as ``init`` returns them.

``logical_axes`` reads those names and asks path patterns (``shardlib.core.patterns``)
only for the leaves without any, such as an NNX model's qk-norm scales or Linen's
unannotated ``LayerNorm``. ``unbox`` gives the plain tree the axes tree matches.
The names are the project's own; ``shardlib.core.aliases`` maps them onto a
rule table's. ``nn.Partitioned`` boxes name mesh axes rather than logical
names; they are read as logical names all the same, so give them rules
(``("model", "model")``) or aliases.

``linen_output_constraints`` constrains the outputs of a Linen model's
submodules without touching its code (``nn.intercept_methods``), and says
which of its patterns matched nothing, and which matched an output it
cannot constrain.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from flax.core import meta
from flax.linen import partitioning as t5x_partitioning
from jax.sharding import PartitionSpec

from shardlib.core.paths import is_flax_box, param_path, path_str
from shardlib.core.patterns import AxisPatterns, LeafToAssign, assign_logical_axes, leaf_shape, segment_regex
from shardlib.core.rules import LogicalAxes, ShardingError, ShardingWarning

PyTree = Any
# NNX's metadata keys for logical names, newest first (the older two are deprecated aliases).
NNX_AXES_KEYS: tuple[str, ...] = ("out_sharding", "sharding_names", "sharding")
# T5X style: collection c's names are in collection c + AXES_SUFFIX, each leaf's under its name + AXES_SUFFIX.
AXES_SUFFIX = "_axes"


def _check_tree(tree: PyTree, caller: str) -> None:
    if isinstance(tree, nnx.Module):
        raise ShardingError(
            f"{caller} got an nnx.Module; pass its parameter state, nnx.state(model, nnx.Param), "
            "(nnx.eval_shape or jax.eval_shape of it for an abstract model)"
        )


def unbox(tree: PyTree) -> PyTree:
    """The plain tree of arrays under Flax's boxes: what ``jit``, optax and ``tree_shardings`` take.

    An ``nnx.State`` becomes ``nnx.to_pure_dict(state)``; Linen boxes
    (``nn.LogicallyPartitioned``) and loose ``nnx.Variable`` leaves become their
    values; anything else is returned as it is. Shapes are unchanged, so the
    result may hold arrays or ShapeDtypeStructs alike.
    """
    _check_tree(tree, "unbox")
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return jax.tree.map(unbox_leaf, tree, is_leaf=is_flax_box)


def unbox_leaf(leaf: Any) -> Any:
    """The value in a Flax box or NNX variable; any other leaf as it is."""
    if isinstance(leaf, nnx.Variable):
        return leaf.get_value()
    if isinstance(leaf, meta.AxisMetadata):
        return leaf.unbox()
    return leaf


def metadata_axes(leaf: Any, path: str = "<leaf>") -> LogicalAxes | None:
    """The logical names a Flax box or variable carries, or None when it carries none.

    Raises:
      ShardingError: metadata that is not a sequence of names (an
        already-resolved ``NamedSharding``, say), naming ``path``.
    """
    names: Any
    if isinstance(leaf, meta.Partitioned):  # nn.LogicallyPartitioned is a subclass
        names = leaf.names
    elif isinstance(leaf, nnx.Variable):
        found = leaf.get_metadata()
        names = next((found[k] for k in NNX_AXES_KEYS if found.get(k) is not None), None)
    else:
        return None
    return _checked_names(names, path)


def _checked_names(names: Any, path: str) -> LogicalAxes | None:
    """``names`` as a tuple of logical names (None stays None); ShardingError naming ``path`` otherwise."""
    if names is None:
        return None
    if isinstance(names, PartitionSpec):
        names = tuple(names)
    if not (isinstance(names, tuple | list) and all(n is None or isinstance(n, str) for n in names)):
        raise ShardingError(
            f"{path}: its Flax sharding metadata is {names!r}; expected a tuple of logical names (or None)"
        )
    return tuple(names)


def _is_t5x_axes(x: Any) -> bool:
    return isinstance(x, t5x_partitioning.AxisMetadata)


def t5x_axes(tree: PyTree) -> dict[tuple[str, ...], tuple[str, LogicalAxes | None]]:
    """The names of T5X-style axes collections: parameter path -> (the entry's path, its names).

    ``tree`` is Linen variables; for every collection ``c`` it holds beside a
    ``c_axes`` one, ``c_axes/.../kernel_axes`` names the axes of ``c/.../kernel``
    (``("params", ..., "kernel")``). Anything else gives ``{}``.

    Raises:
      ShardingError: an entry that is not an ``AxisMetadata`` under a name
        ending in ``_axes``, or whose names are not a tuple of strings, named.
    """
    if not isinstance(tree, Mapping):
        return {}
    found: dict[tuple[str, ...], tuple[str, LogicalAxes | None]] = {}
    for collection in tree:
        axes_collection = f"{collection}{AXES_SUFFIX}"
        if not isinstance(collection, str) or axes_collection not in tree:
            continue
        entries = jax.tree_util.tree_flatten_with_path(tree[axes_collection], is_leaf=_is_t5x_axes)[0]
        for keypath, entry in entries:
            names = param_path(keypath)
            where = "/".join((axes_collection, *names))
            if not (_is_t5x_axes(entry) and names and names[-1].endswith(AXES_SUFFIX)):
                raise ShardingError(
                    f"{where}: a T5X axes collection holds flax.linen.partitioning.AxisMetadata under "
                    f"<parameter>{AXES_SUFFIX} names, not {type(entry).__name__}"
                )
            target = (collection, *names[:-1], names[-1][: -len(AXES_SUFFIX)])
            found[target] = (where, _checked_names(entry.names, where))
    return found


def _annotated_leaves(tree: PyTree) -> tuple[list[tuple[tuple[str, ...], LeafToAssign]], PyTree]:
    """(parameter path, leaf to assign) for every leaf of ``tree``, and the plain tree they describe.

    A leaf's axes come from its box or variable, else from its T5X axes entry; an entry for no leaf,
    or one that contradicts the leaf's box, is an error naming both.
    """
    t5x = t5x_axes(tree)
    entries = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_flax_box)[0]:
        path, key = path_str(keypath), param_path(keypath)
        axes = metadata_axes(leaf, path)
        where, t5x_names = t5x.pop(key, (None, None))
        if axes is not None and t5x_names is not None and axes != t5x_names:
            raise ShardingError(f"{path}: its Flax box names logical axes {axes} but {where} names {t5x_names}")
        entries.append((key, LeafToAssign(path, leaf_shape(unbox_leaf(leaf)), t5x_names if axes is None else axes)))
    if t5x:
        stale = ", ".join(f"{where} (for {'/'.join(key)})" for key, (where, _) in sorted(t5x.items()))
        raise ShardingError(f"T5X axes entries name parameters the variables do not hold: {stale}")
    return entries, unbox(tree)


def _missing_note(tree: PyTree, lacking: str) -> str:
    """``lacking`` (what a leaf without axes lacks, for the error), with the T5X entry when ``tree`` has those."""
    if isinstance(tree, Mapping) and any(f"{c}{AXES_SUFFIX}" in tree for c in tree if isinstance(c, str)):
        return f"{lacking}, nor a T5X <collection>{AXES_SUFFIX}/.../<name>{AXES_SUFFIX} entry"
    return lacking


def _axes_tree(plain: PyTree, axes_by_path: dict[tuple[str, ...], LogicalAxes]) -> PyTree:
    # Looked up by path rather than zipped in flatten order: an nnx.State and its pure dict
    # need not flatten in the same order.
    return jax.tree_util.tree_map_with_path(lambda keypath, _: axes_by_path[param_path(keypath)], plain)


def logical_axes(tree: PyTree, patterns: AxisPatterns = (), *, strict: bool = True) -> PyTree:
    """Logical axes of every parameter: Flax's metadata where it has some, else the patterns.

    Args:
      tree: Linen variables or params as ``init`` returns them (boxed, or
        T5X-style: ``{"params": ..., "params_axes": ...}``, the names read
        from the axes collection), an ``nnx.State`` (``nnx.state(model,
        nnx.Param)``, abstract or not), or any plain pytree (then the
        patterns alone decide, as in ``match_logical_axes``).
      patterns: ``(regex, logical axes | None)`` pairs for the leaves without
        metadata, matched against whole segments of the leaf's path without
        the box's ``/value`` (``params/norm/scale``); first match wins.
      strict: a leaf neither metadata nor a pattern covers is an error, as
        are a catch-all pattern and a pattern matching no leaf;
        ``strict=False`` replicates uncovered leaves (``shardlib.core.patterns``).
    Returns:
      A tree with the structure of ``unbox(tree)`` whose leaves are tuples of
      logical names, one per dimension (a T5X ``params_axes`` collection stays
      as it is: its ``AxisMetadata`` hold no leaves, so ``tree_shardings`` and
      ``jax.device_put`` of the whole variables match it).
    Raises:
      ShardingError: naming the leaf or pattern at fault (for T5X trees also
        an axes entry for no parameter, or one its parameter's box contradicts).
    """
    _check_tree(tree, "logical_axes")
    entries, plain = _annotated_leaves(tree)
    assigned = assign_logical_axes(
        [leaf for _, leaf in entries],
        patterns,
        strict=strict,
        unmatched_note=f"({_missing_note(tree, 'no Flax metadata')} either)",
    )
    return _axes_tree(plain, {path: axes for (path, _), axes in zip(entries, assigned, strict=True)})


def logical_axes_from_state(state: PyTree) -> PyTree:
    """Logical axes from Flax metadata alone: every parameter must carry them.

    ``state`` is an ``nnx.State`` (the result is a pure dict, like
    ``nnx.to_pure_dict(state)``) or Linen variables/params with boxes or T5X
    axes collections (the result has the structure of ``unbox(state)``). A leaf without metadata is
    an error naming it: an unannotated parameter would otherwise be replicated
    silently. To cover such leaves by path patterns, use ``logical_axes``.
    """
    _check_tree(state, "logical_axes_from_state")
    entries, plain = _annotated_leaves(state)
    axes_by_path: dict[tuple[str, ...], LogicalAxes] = {}
    for path, leaf in entries:
        if leaf.metadata_axes is None:
            raise ShardingError(
                f"parameter {leaf.path} has no logical axes "
                f"({_missing_note(state, 'no out_sharding metadata or Linen partitioning box')}); "
                "to give it axes by path, use shardlib.logical_axes(state, patterns)"
            )
        if len(leaf.metadata_axes) != len(leaf.shape):
            raise ShardingError(
                f"{leaf.path}: its Flax metadata names logical axes {leaf.metadata_axes} but the leaf has "
                f"shape {leaf.shape}"
            )
        axes_by_path[path] = leaf.metadata_axes
    return _axes_tree(plain, axes_by_path)


def linen_output_constraints(
    shard: Callable[[jax.Array, LogicalAxes], jax.Array], patterns: AxisPatterns, *, strict: bool = True
) -> Callable[..., Any]:
    """A Linen method interceptor that constrains submodules' outputs by logical names.

    Use it around ``apply`` inside ``jit``, for a model with no activation
    constraints of its own::

        shard = ActivationSharding(rules, mesh)
        constrain = linen_output_constraints(shard, [("mlp$", ("batch", "length", "embed"))])
        with nn.intercept_methods(constrain):
            logits = model.apply(variables, tokens)

    Args:
      shard: ``ActivationSharding(rules, mesh)`` or any ``(x, logical axes) -> x``.
      patterns: ``(regex, logical axes)`` pairs matched, by whole path
        segments, against the module's path (``block_0/mlp``, as in the
        parameter paths without ``params/``); the first match wins, None
        leaves the output alone. Only ``__call__`` outputs that are single
        arrays can be constrained.
      strict: at the end of each outermost call (one ``apply``), a pattern
        that matched no module's ``__call__`` is an error, and so is a module
        whose first matching pattern gives axes while it returns something
        other than one array (a tuple); ``strict=False`` warns instead
        (``ShardingWarning``), e.g. for an ``apply`` of a method that runs only
        part of the model.
    Raises (when called, at trace time):
      ShardingError: an output whose rank differs from the pattern's axes,
        naming the module and the pattern; with ``strict``, the two above.
    """
    return _OutputConstraints(shard, patterns, strict)


class _OutputConstraints:
    """``linen_output_constraints``'s interceptor; one pass is one outermost call (an ``apply``)."""

    def __init__(self, shard: Callable[[jax.Array, LogicalAxes], jax.Array], patterns: AxisPatterns, strict: bool):
        self.shard, self.strict = shard, strict
        self.table = [(segment_regex(p), p, None if axes is None else tuple(axes)) for p, axes in patterns]
        self.depth = 0
        self.called: list[str] = []  # the pass's module paths, in call order (the model first)
        self.used: set[int] = set()  # the patterns that matched one of them

    def __call__(
        self, next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], context: Any
    ) -> Any:
        self.depth += 1
        path = "/".join(str(name) for name in context.module.path)
        if context.method_name == "__call__":
            self.called.append(path)
        try:
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                out = self._constrain(out, path)
        except BaseException:
            self._start_pass()
            raise
        finally:
            self.depth -= 1
        if self.depth == 0 and context.method_name != "setup":  # the outermost call is done (setup runs first)
            self._end_pass()
        return out

    def _constrain(self, out: Any, path: str) -> Any:
        matching = [i for i, (regex, _, _) in enumerate(self.table) if regex.search(path)]
        self.used.update(matching)
        if not matching:
            return out
        _, source, axes = self.table[matching[0]]
        if axes is None:
            return out
        if not isinstance(out, jax.Array):
            self._report(
                f"module {path or '(the model)'} returns a {type(out).__name__} from __call__, which pattern "
                f"{source!r} cannot constrain (only one array); anchor the pattern to the submodule whose output "
                "it means, or give it None"
            )
            return out
        if len(axes) != out.ndim:
            raise ShardingError(
                f"module {path}: output of shape {out.shape} but pattern {source!r} gives logical axes {axes}"
            )
        return self.shard(out, axes)

    def _end_pass(self) -> None:
        unused = [source for i, (_, source, _) in enumerate(self.table) if i not in self.used]
        shown = self.called[:12]
        called = ", ".join(p or "(the model)" for p in shown) + (", ..." if len(self.called) > len(shown) else "")
        self._start_pass()
        if unused:
            fix = " Remove them, or pass strict=False to only warn" if self.strict else ""
            self._report(
                f"pattern(s) {unused} match no module's __call__ (modules called: {called}); mistyped, or for "
                f"another model?{fix}"
            )

    def _start_pass(self) -> None:
        self.called, self.used = [], set()

    def _report(self, message: str) -> None:
        if self.strict:
            raise ShardingError(message)
        warnings.warn(message, ShardingWarning, stacklevel=5)
