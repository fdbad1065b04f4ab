"""A Flax model's stacked layers as the pipeline's layer: Linen ``nn.scan`` bodies and NNX stacked modules.

Other codebases stack their layers one of two ways:

* Linen: ``nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
  length=n_layers)``, whose params are the block's with a leading layer axis
  under the scanned module's name (``params["layers"]``);
* NNX: a block created under ``nnx.vmap`` (or ``nnx.split_rngs`` + ``nnx.vmap``)
  and run with ``nnx.scan``: one module whose state leaves carry the layer axis.

``linen_layer`` and ``nnx_layer`` turn the block into ``layer(layer_params, x)``,
one slice of the stack applied to the carry, which ``stacked_stage_functions``
runs over each chunk of the pipeline; ``split_stacked`` cuts the model's params
into the stack (the executor's ``layers``) and the rest (its ``outer``), and
``merge_stacked`` puts the gradients back together.

A Linen block's ``nn.Dense`` layers (default ``dot_general`` and precision) are
routed through the weight-use hook (``dense_weight_uses``): each applies its
kernel as ``use("path/of/the/dense", x, kernel)``, so split (zero-bubble)
tables defer every Dense kernel's gradient to W with no change to the model;
its bias and every other weight (norm scales, ``DenseGeneral``, ``Einsum``)
get their gradients in B.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from shardlib.parallel.weight_use import WeightUse, WeightUseSpec

PyTree = Any


def _dense_apply(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``nn.Dense``'s product: x's last axis against the kernel's first."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class _DenseUses(Mapping):
    """The weight-use table of every ``nn.Dense`` in a block, by its path: each reads its own input."""

    def __getitem__(self, name: str) -> WeightUseSpec:
        return WeightUseSpec(_dense_apply, name, input_axes=(), output_axes=())

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


dense_weight_uses: Mapping[str, WeightUseSpec] = _DenseUses()
"""The table ``linen_layer``'s layers apply their ``nn.Dense`` kernels by (any path is a name)."""


def _routing_dense(use: WeightUse) -> Callable:
    """A Linen interceptor applying each plain ``nn.Dense`` through ``use``, named by its module path."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        plain = type(module) is nn.Dense and module.dot_general is None and module.dot_general_cls is None
        if not plain or context.method_name != "__call__" or module.precision is not None:
            return next_fun(*args, **kwargs)
        (x,) = args
        kernel = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
        y = use("/".join(module.path), x, kernel)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

    return interceptor


def linen_layer(
    block: nn.Module, *, scan_body: bool = True, route_dense: bool = True
) -> tuple[Callable, Mapping[str, WeightUseSpec] | None]:
    """(layer, weight-use table) for a Linen block: one layer of the stack, as the pipeline runs it.

    Args:
      block: the unscanned block module (what ``nn.scan`` wraps), built with the same
        attributes as the scanned one.
      scan_body: the block has ``nn.scan``'s body signature, ``block(carry, xs) -> (carry, ys)``,
        called as ``block(x, None)`` (its ys dropped); off, ``block(x) -> x``.
      route_dense: apply its ``nn.Dense`` kernels through the weight-use hook (the module's
        docstring), returning ``dense_weight_uses`` as the table; off, the table is None.
    Returns:
      ``layer(layer_params, x[, use])``: ``layer_params`` one layer's params (the block's own
      tree, without the leading layer axis), ``x`` the carry (any pytree); pass both to
      ``stacked_stage_functions(..., weight_uses=table)``.
    """

    def apply(p, x):
        out = block.apply({"params": p}, x, None) if scan_body else block.apply({"params": p}, x)
        return out[0] if scan_body else out

    if not route_dense:
        return apply, None

    def layer(p, x, use):
        with nn.intercept_methods(_routing_dense(use)):
            return apply(p, x)

    return layer, dense_weight_uses


def nnx_layer(stacked: nnx.Module, *, method: str = "__call__") -> Callable:
    """``layer(layer_params, x) -> x`` for an NNX block stacked with ``nnx.vmap``: the block whose state is
    ``layer_params`` (one slice of ``nnx.to_pure_dict(nnx.state(stacked))``), called on ``x``
    (``method``: which of its methods; it returns the new carry)."""
    graphdef = nnx.graphdef(stacked)

    def layer(p, x):
        return getattr(nnx.merge(graphdef, p), method)(x)

    return layer


def split_stacked(params: Mapping, path: str | Sequence[str]) -> tuple[PyTree, dict]:
    """(the stacked subtree at ``path``, the params without it): the executor's ``layers`` and ``outer``.

    ``params``: nested mappings (Linen's ``variables["params"]``, ``nnx.to_pure_dict`` of an NNX
    state); ``path``: the stack's key, or keys down to it (``("decoder", "layers")``).
    """
    keys = (path,) if isinstance(path, str) else tuple(path)
    node = params
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(keys[:depth]) or "the params"
            known = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"split_stacked: {where} has no {key!r} (it holds {known})")
        node = node[key]
    return node, _without(params, keys)


def _without(tree: Mapping, keys: tuple) -> dict:
    head, *rest = keys
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {k: (_without(v, tuple(rest)) if k == head else v) for k, v in tree.items()}


def merge_stacked(stacked: PyTree, rest: Mapping, path: str | Sequence[str]) -> dict:
    """``split_stacked``'s inverse: ``rest`` with ``stacked`` at ``path`` (e.g. the two halves of the gradients)."""
    keys = (path,) if isinstance(path, str) else tuple(path)
    head, *tail = keys
    if not tail:
        return {**rest, head: stacked}
    return {**rest, head: merge_stacked(stacked, rest.get(head, {}), tuple(tail))}
