"""The minimum-byte weight-gradient reduction for a Linen model, with no change to its code.

    reduction = LinenReduction(shard)          # shard: shardlib.ActivationSharding(rules, mesh)
    with nn.intercept_methods(reduction):
        loss = loss_fn(model.apply(params, batch))

``LinenReduction`` is an ``nn.intercept_methods`` interceptor. Every call of an
``nn.Dense``, an ``nn.DenseGeneral`` or an ``nn.Embed`` (its lookup and its
``attend``) becomes a use of ``shardlib.parallel.reduction.ReducedWeightUse``:
the same forward pass (the module's own ``promote_dtype``, ``precision`` and
contraction), with the kernel's (and bias's) gradient taken from each
device's own tokens and reduced once, a reduce-scatter over the token axes the
weight is sharded over (FSDP) and one all-reduce over the others (data
parallelism, HSDP's ``data_replica``). Left to the partitioner, XLA:CPU emits
an all-reduce and a slice for an FSDP weight instead: twice the bytes.

Each use is built from what the module already says:

* the weight's logical axes: from ``param_axes`` (a tree such as
  ``shardlib.logical_axes`` returns, which also covers path patterns) at the
  module's path, else from the box its ``kernel_init`` / ``bias_init`` /
  ``embedding_init`` returns (``nn.with_logical_partitioning``; a
  ``nn.with_partitioning`` box names mesh axes directly). Under ``nn.scan``
  the module sees one layer: the tree's leading stacked dimensions are dropped
  (the init's box has none);
* the activations' logical axes: ``token_names`` for the input's leading
  dimensions (``("batch", "length")``; more leading dimensions are whole),
  then the weight's input axes; the output's, the same leading names and the
  weight's output axes.

What falls back to the partitioner, recorded in ``left`` (module path -> why;
``strict=True`` raises instead), and why:

* other modules' own parameters (norms, a position table, a custom
  ``self.param``): the interceptor sees a method call, not how the parameter
  is used, so it cannot take the gradient's contraction over the tokens;
* a Dense with a custom ``dot_general`` / ``dot_general_cls`` (quantized, not
  linear in the weight), a ``DenseGeneral`` with ``batch_dims`` or axes that
  are not the input's trailing ones, subclasses (their ``__call__`` may
  differ), and weights without logical axes: their math or their layout is
  not known;
* everything when no token axis splits anything (nothing to reduce).

A weight the rules leave replicated over the token axes is reduced too (one
all-reduce over all of them, where the partitioner makes one per axis). Not
covered: gradient accumulation's deferred reduction (use
``reduction.reduced_weight_use(..., deferred=True)`` with
``reduce_deferred_params``) and NNX modules (call ``reduced_weight_use`` from
the layer: NNX has no method interceptor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from shardlib.core.rules import logical_to_spec
from shardlib.parallel.reduction import ReducedWeightUse, token_mesh_axes
from shardlib.parallel.weight_use import WeightUseSpec

Names = tuple[str | None, ...]


class LinenReduction:
    """An ``nn.intercept_methods`` interceptor routing ``nn.Dense`` / ``DenseGeneral`` / ``Embed`` through
    ``ReducedWeightUse`` (module docstring).

    Args:
      shard: the activations' sharding (``shardlib.ActivationSharding``): its rules resolve the
        weights' and activations' logical axes on its mesh (Auto axes); the token axes are
        those the rules split ``batch`` and ``length`` over.
      param_axes: optional tree of logical axes (``shardlib.logical_axes(variables, patterns)``),
        with or without its ``params`` root; read before the modules' init boxes.
      token_names: the logical names of an input's leading (token) dimensions.
      strict: raise ValueError for anything left to the partitioner, instead of recording it.
      reduce_dtype: the dtype the gradients' collectives carry (None: the weight's).

    After a trace, ``reduced`` holds module path -> {parameter name: its spec as the use sees it}
    and ``left`` module path -> the reason it was left to the partitioner (``describe()`` prints both).
    """

    def __init__(
        self,
        shard: Any,
        *,
        param_axes: Any = None,
        token_names: Sequence[str] = ("batch", "length"),
        strict: bool = False,
        reduce_dtype: DTypeLike | None = None,
    ):
        self.shard = shard
        self.param_axes = param_axes.get("params", param_axes) if isinstance(param_axes, Mapping) else None
        self.token_names = tuple(token_names)
        self.strict = strict
        self.reduce_dtype = reduce_dtype
        rows, positions = token_mesh_axes(shard.rules, shard.mesh)
        self.token_axes = (rows, positions)
        self.reduced: dict[str, dict[str, P]] = {}
        self.left: dict[str, str] = {}

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module, method = context.module, context.method_name
        if method not in ("__call__", "attend") or module.is_initializing() or not any(self.token_axes):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path) or type(module).__name__
        kind = type(module)
        if kind not in (nn.Dense, nn.DenseGeneral, nn.Embed):
            if method == "__call__" and _own_params(module):
                self._leave(path, f"{kind.__name__} uses its own parameters {_own_params(module)} itself")
            return next_fun(*args, **kwargs)
        reason = _unsupported(module, args, kwargs)
        if reason:
            self._leave(path, reason)
            return next_fun(*args, **kwargs)
        (x,) = args
        try:
            if kind is nn.Embed:
                return self._embed(module, path, method, x)
            return self._dense(module, path, x)
        except _Unannotated as unannotated:
            self._leave(path, str(unannotated))
            return next_fun(*args, **kwargs)

    def describe(self) -> str:
        """One line per module: what was reduced (and its specs), what was left to the partitioner and why."""
        lines = [f"{path}: reduced per use, {specs}" for path, specs in sorted(self.reduced.items())]
        lines += [f"{path}: left to the partitioner: {why}" for path, why in sorted(self.left.items())]
        return "\n".join(lines)

    # --- the uses -------------------------------------------------------------------------------

    def _dense(self, module: nn.Module, path: str, x: jax.Array) -> jax.Array:
        features = _tuple(module.features)
        axis = _trailing_axes(module, x.ndim)
        kernel = self._param(module, "kernel")
        bias = self._param(module, "bias") if module.use_bias else None
        x, kernel_c, _ = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
        n_in, lead = len(axis), x.ndim - len(axis)
        dims = ((axis, tuple(range(n_in))), ((), ()))
        kernel_names = self._names(module, path, "kernel", kernel.shape, module.kernel_init)
        leading = self._leading(lead)
        x_axes, y_axes = leading + kernel_names[:n_in], leading + kernel_names[n_in:]
        y = self._use(
            path,
            "kernel",
            WeightUseSpec(
                lambda x_, w: jax.lax.dot_general(x_, w.astype(kernel_c.dtype), dims, precision=module.precision),
                path,
                x_axes,
                y_axes,
            ),
            x,
            kernel,
            kernel_names,
        )
        if bias is None:
            return y
        try:
            bias_names = self._names(module, path, "bias", bias.shape, module.bias_init)
        except _Unannotated:  # an unannotated bias follows the kernel's output axes
            bias_names = kernel_names[n_in:]
        n_out = len(features)
        add = WeightUseSpec(
            lambda y_, b: jnp.broadcast_to(b.astype(y_.dtype), (*y_.shape[: y_.ndim - n_out], *b.shape)),
            path,
            y_axes,
            y_axes,
        )
        return y + self._use(path, "bias", add, y, bias, bias_names)

    def _embed(self, module: nn.Module, path: str, method: str, x: jax.Array) -> jax.Array:
        table = self._param(module, "embedding")
        names = self._names(module, path, "embedding", table.shape, module.embedding_init)
        if method == "__call__":
            (table_c,) = module.promote_dtype(table, dtype=module.dtype, inexact=False)
            leading = self._leading(x.ndim)
            lookup = WeightUseSpec(lambda ids, t: jnp.take(t, ids, axis=0), path, leading, leading + names[1:])
            return self._use(path, "embedding", lookup, x, table, names, lookup=True).astype(table_c.dtype)
        x, table_c = module.promote_dtype(x, table, dtype=module.dtype)
        leading = self._leading(x.ndim - 1)
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        attend = WeightUseSpec(
            lambda q, t: jax.lax.dot_general(q, t.astype(table_c.dtype), dims),
            f"{path}.attend",
            leading + names[1:],
            leading + names[:1],
        )
        return self._use(f"{path}.attend", "embedding", attend, x, table, names)

    def _use(
        self,
        path: str,
        param: str,
        use: WeightUseSpec,
        x: jax.Array,
        w: jax.Array,
        names: Names,
        *,
        lookup: bool = False,
    ) -> jax.Array:
        """``use.apply(x, w)`` with ``w``'s gradient reduced per use (``ReducedWeightUse``)."""
        name = f"{path}/{param}"
        spec = self._spec(name, w, names)
        self.reduced.setdefault(path, {})[param] = spec
        rows, positions = self.token_axes
        reduced = ReducedWeightUse(
            self.shard.mesh,
            {name: use},
            {name: spec},
            self.shard.spec,
            rows,
            positions,
            (name,) if lookup else (),
            reduce_dtype=self.reduce_dtype,
        )
        return reduced(name, x, w)

    # --- what the module says -------------------------------------------------------------------

    def _param(self, module: nn.Module, name: str) -> jax.Array:
        return meta.unbox(module.get_variable("params", name))

    def _leading(self, n: int) -> Names:
        """The logical names of ``n`` leading (token) dimensions: ``token_names``, then whole ones."""
        return (self.token_names + (None,) * n)[:n]

    def _names(self, module: nn.Module, path: str, param: str, shape: tuple, init: Callable) -> Names:
        """``param``'s logical axes (or mesh axes, for a ``Partitioned`` box) as the module sees it."""
        names = self._tree_names(module.path, param, len(shape))
        if names is None:
            box = jax.eval_shape(lambda: init(jax.random.key(0), shape, jnp.float32))
            names = None
            if isinstance(box, meta.Partitioned):
                names = tuple(box.names)
                if not isinstance(box, nn.LogicallyPartitioned):
                    names = ("__mesh__", *names)  # mesh axes: _spec takes them as they are
        if names is None:
            raise _Unannotated(f"{param} has no logical axes (no param_axes entry, no partitioning box)")
        return names

    def _tree_names(self, module_path: tuple[str, ...], param: str, ndim: int) -> Names | None:
        node = self.param_axes
        for key in (*module_path, param):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            return None
        names = tuple(node)
        return names[len(names) - ndim :] if len(names) > ndim else names  # stacked: one layer's

    def _spec(self, name: str, w: jax.Array, names: Names) -> P:
        """The weight's PartitionSpec: its logical axes resolved by the rules, or its mesh axes as they are."""
        if names and names[0] == "__mesh__":
            spec = P(*names[1:])
            if len(spec) != w.ndim:
                raise ValueError(f"{name}: partitioning {spec} names {len(spec)} dimensions, the weight has {w.ndim}")
            return spec
        return logical_to_spec(names, self.shard.rules, self.shard.mesh, shape=w.shape, path=name)

    def _leave(self, path: str, reason: str) -> None:
        if self.strict:
            raise ValueError(f"{path}: {reason}; left to the partitioner, which strict=True refuses")
        self.left[path] = reason


class _Unannotated(Exception):
    """A weight without logical axes: its module is left to the partitioner."""


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,)


def _trailing_axes(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """The contracted input dimensions of a Dense (the last) or DenseGeneral (its ``axis``), ascending."""
    if type(module) is nn.Dense:
        return (ndim - 1,)
    return tuple(sorted(a % ndim for a in _tuple(module.axis)))


def _unsupported(module: nn.Module, args: tuple, kwargs: dict) -> str:
    """Why this Dense / DenseGeneral / Embed call cannot be a reduced use ('' when it can)."""
    if kwargs or len(args) != 1:
        return "called with arguments other than one input"
    if type(module) is nn.Embed:
        return "an Embed of one row (a broadcast, not a lookup)" if module.num_embeddings == 1 else ""
    if module.dot_general is not None or module.dot_general_cls is not None:
        return "a custom dot_general (not known to be linear in the kernel)"
    if type(module) is nn.DenseGeneral:
        if _tuple(module.batch_dims):
            return "DenseGeneral with batch_dims"
        ndim = jnp.ndim(args[0])
        axis = _trailing_axes(module, ndim)
        if axis != tuple(range(ndim - len(axis), ndim)):
            return f"DenseGeneral over axes {module.axis}, not the input's trailing ones"
    return ""


def _own_params(module: nn.Module) -> list[str]:
    """The parameters ``module`` holds itself (not its children's)."""
    params = module.variables.get("params", {})
    return sorted(k for k, v in params.items() if not isinstance(v, Mapping))
