"""Read a Hugging Face Llama-family checkpoint directory into shardlib parameters, each device's shard only.

The directory holds ``config.json`` and the weights: one ``model.safetensors``,
or several files listed by ``model.safetensors.index.json``. Every parameter
is built with ``jax.make_array_from_callback`` on its target ``NamedSharding``:
the callback runs for this process's devices only and reads, through
``safetensors``' lazy ``get_slice``, just the rows and columns of the shard
that device holds (``hf_layout.read_param_block``; a fused parameter such as
``layers/qkv`` reads each of its HF tensors for the part of the shard it
fills). No parameter is ever whole on
one device unless its sharding replicates it, and each distinct shard is read
once even when several devices hold it. The host holds at most this
process's shards of one parameter at a time (with one process: at most one
whole parameter), between the read and their transfer to the devices.

The HF-name <-> shardlib-path mapping and all transposes come from the table
in ``shardlib.interop.hf_layout``.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from shardlib.interop.hf_config import (
    CONFIG_FILE,
    HFFormatError,
    check_model_matches,
    model_config_from_hf,
    read_hf_config,
)
from shardlib.interop.hf_layout import (
    IGNORED_SUFFIXES,
    axis_sizes,
    model_layouts,
    param_shape,
    parameters,
    read_param_block,
)
from shardlib.models.config import ModelConfig

PyTree = Any
INDEX_FILE = "model.safetensors.index.json"


def tensor_files(hf_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: the file holding it}, from the index if there is one, else from every ``*.safetensors``."""
    hf_dir = pathlib.Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise HFFormatError(f"{index} is not a safetensors index (no readable weight_map: {err!r})") from err
        files: dict[str, pathlib.Path] = {name: hf_dir / file for name, file in weight_map.items()}
        for name, path in files.items():
            if not path.is_file():
                raise HFFormatError(f"{index} puts tensor {name} in {path.name}, which does not exist")
        return files
    paths = sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise HFFormatError(f"{hf_dir} holds no *.safetensors weights (nor {INDEX_FILE})")
    files = {}
    for path in paths:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if name in files:
                    raise HFFormatError(f"tensor {name} is in both {files[name].name} and {path.name}")
                files[name] = path
    return files


class _Reader:
    """Open safetensors handles, one per file, for reading tensor shapes and slices lazily."""

    def __init__(self, files: dict[str, pathlib.Path], stack: contextlib.ExitStack):
        self.files = files
        self._stack = stack
        self._handles: dict[pathlib.Path, Any] = {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        return self._handle(name).get_slice(name)[slices]


def _check_tensors(reader: _Reader, layouts, sizes: dict[str, int], hf_dir: pathlib.Path, tied: bool) -> None:
    """Every tensor the model needs is there with its shape; nothing is left that the model has no place for."""
    wanted = set()
    for layout in layouts:
        expected = layout.hf_shape(sizes)
        for name in layout.hf_names(sizes["layer"]):
            wanted.add(name)
            if name not in reader.files:
                raise HFFormatError(f"{hf_dir}: tensor {name} (shardlib {layout.path}) is missing")
            if (shape := reader.shape(name)) != expected:
                axes = " x ".join("(" + " ".join(g) + ")" if len(g) > 1 else g[0] for g in layout.hf_groups)
                raise HFFormatError(
                    f"{hf_dir}: tensor {name} in {reader.files[name].name} has shape {list(shape)}, "
                    f"expected {list(expected)} ({axes} from {CONFIG_FILE})"
                )
    skipped = {"lm_head.weight"} if tied else set()  # a tied checkpoint may still carry a copy
    extra = sorted(n for n in reader.files if n not in wanted | skipped and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise HFFormatError(
            f"{hf_dir} holds tensors shardlib's model has no place for: {', '.join(extra[:3])}{more} "
            "(biases, another architecture?)"
        )


def _leaf(rows, sizes, reader: _Reader, sharding, dtype, layer_order: np.ndarray) -> jax.Array:
    """One shardlib parameter, created shard by shard from its HF tensor(s) (several when fused)."""
    first = rows[0]
    shape = param_shape(rows, sizes)
    shards: dict[tuple, np.ndarray] = {}  # replicated shards are read once

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if ranges not in shards:
            axes = dict(zip(first.per_layer_axes, ranges[1:] if first.stacked else ranges, strict=True))
            if first.stacked:  # stored position p holds logical layer layer_order[p]
                layers = [int(layer_order[p]) for p in range(*ranges[0])]
                block = np.stack([read_param_block(rows, sizes, axes, _layer_reader(reader, i)) for i in layers])
            else:
                block = read_param_block(rows, sizes, axes, _layer_reader(reader, None))
            shards[ranges] = np.ascontiguousarray(block.astype(dtype))
        return shards[ranges]

    # JAX types the callback's index as Optional; for an array of this shape it passes a tuple of slices.
    return jax.make_array_from_callback(shape, sharding, shard)  # type: ignore[arg-type]


def _layer_reader(reader: _Reader, layer: int | None):
    """``read(row, slices)`` of layer ``layer``'s HF tensor of each row (None: an unstacked row)."""

    def read(row, slices):
        return reader.read(row.hf_name if layer is None else row.hf_name.format(i=layer), slices)

    return read


def _get(tree: PyTree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def load_hf_params(
    hf_dir: str | pathlib.Path,
    model: ModelConfig,
    shardings: PyTree,
    *,
    layer_order: np.ndarray | None = None,
) -> PyTree:
    """shardlib parameters (a pure dict, as ``nnx.to_pure_dict``) from checkpoint ``hf_dir``.

    ``shardings``: a ``NamedSharding`` per parameter, same structure (e.g.
    ``TrainingSetup.shardings.params``); every leaf comes back on it, in
    ``model.param_dtype``. Shapes are those of ``shardlib/models/transformer.py``
    (qkv [L, D, N, H/N + 2, K] from q_proj, k_proj, v_proj; qkv_bias [L, N, H/N + 2, K] from
    their biases (Qwen 2); o [L, H, K, D];
    gate_up [L, D, 2, F] from gate_proj, up_proj; down [L, F, D]; norms
    [L, D]; embed [V, D]; unembed [D, V] if untied).
    ``layer_order`` (stored position -> logical layer; a pipeline's layout)
    stacks the layers in that order; default: 0..L-1.

    Raises HFFormatError when ``config.json`` describes something shardlib
    does not compute or differs from ``model`` (the message lists the
    overrides), or a tensor is missing, misshaped or unexpected (it names it).
    """
    hf_dir = pathlib.Path(hf_dir)
    where = str(hf_dir / CONFIG_FILE)
    check_model_matches(model, model_config_from_hf(read_hf_config(hf_dir), where), where)
    sizes = axis_sizes(model)
    order = np.arange(model.n_layers) if layer_order is None else np.asarray(layer_order)
    if sorted(order.tolist()) != list(range(model.n_layers)):
        raise ValueError(f"layer_order {order.tolist()} is not a permutation of the {model.n_layers} layers")
    layouts = model_layouts(model)
    dtype = jax.numpy.dtype(model.param_dtype)
    params: dict = {}
    with contextlib.ExitStack() as stack:
        reader = _Reader(tensor_files(hf_dir), stack)
        _check_tensors(reader, layouts, sizes, hf_dir, model.tie_embeddings)
        for path, rows in parameters(layouts).items():
            *parents, name = path.split("/")
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            node[name] = _leaf(rows, sizes, reader, _get(shardings, path), dtype, order)
    expected = jax.tree_util.tree_structure(shardings)
    # mypy does not resolve PyTreeDef (jaxlib's compiled module), hence the ignore.
    if jax.tree_util.tree_structure(params) != expected:  # type: ignore[operator]  # the table no longer covers the model
        raise RuntimeError(f"hf_layout's table does not cover the model's parameters: {expected}")
    return params
