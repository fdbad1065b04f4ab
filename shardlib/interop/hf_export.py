"""Write shardlib parameters as a Hugging Face checkpoint (Llama, Mistral or Qwen 2): config.json, safetensors, index.

``export_hf`` goes tensor by tensor in HF order and holds at most one output
file's tensors on the host at a time. Each HF tensor is one layer of a stacked
parameter (or a whole unstacked one), or its part of one: q_proj, k_proj and
v_proj are cut from one layer of ``layers/qkv``, gate_proj and up_proj from
``layers/gate_up`` (the layer is fetched once for all of them). With one process, it is copied to the
host straight from the addressable shards that hold it (the devices slice out
that one layer; nothing is gathered on a device). With several processes,
where no process can address every shard, that one layer is gathered under
jit onto every device (all processes must call ``export_hf``); process 0
writes the files. Files are cut at ``max_shard_bytes``; a single file is
``model.safetensors`` without an index, as ``transformers`` writes it.

A run's newest checkpoint is exported by the training layer, which restores it:
``python -m shardlib.training.hf_export --run-dir runs/x --out hf/x`` (``export_run``).
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from shardlib.interop.hf_config import CONFIG_FILE, hf_config_from_model
from shardlib.interop.hf_import import INDEX_FILE
from shardlib.interop.hf_layout import TensorLayout, axis_sizes, model_layouts, to_hf
from shardlib.models.config import ModelConfig

PyTree = Any
DEFAULT_SHARD_BYTES = 2 * 1024**3
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3}


def parse_size(text: str) -> int:
    """``"48KB"``, ``"2GB"``, ``"1000"`` -> bytes (binary units, as the fixture script's ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"cannot read size {text!r}; write e.g. 500MB or 2GB")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _from_shards(array: jax.Array) -> np.ndarray:
    """A fully addressable array on the host, copied shard by shard (each distinct shard once)."""
    out = np.empty(array.shape, array.dtype)
    seen = set()
    for shard in array.addressable_shards:
        key = tuple(s.indices(n)[:2] for s, n in zip(shard.index, array.shape, strict=True))
        if key not in seen:
            seen.add(key)
            out[shard.index] = np.asarray(shard.data)
    return out


@functools.cache
def _layer_slicer(sharding: NamedSharding, replicated: bool):
    """jit of ``(stack, p) -> stack[p]``: sharded like one layer of ``sharding``, or replicated."""
    spec = PartitionSpec() if replicated else PartitionSpec(*sharding.spec[1:])
    return jax.jit(lambda w, p: w[p], out_shardings=NamedSharding(sharding.mesh, spec))


def _host_block(leaf: jax.Array, position: int | None) -> np.ndarray:
    """``leaf[position]`` (or all of ``leaf``) as a host array.

    One process: the layer is sliced out on the devices that hold it (one
    compiled slice per parameter, no gather), then copied shard by shard.
    Several processes (no process addresses every shard): the layer is
    gathered onto every device under jit, which every process must call.
    """
    if not leaf.is_fully_addressable:
        # The project places every parameter with a NamedSharding; Sharding itself has no mesh.
        replicated = NamedSharding(leaf.sharding.mesh, PartitionSpec())  # type: ignore[attr-defined]
        if position is None:
            block = jax.jit(lambda w: w, out_shardings=replicated)(leaf)
        else:
            block = _layer_slicer(leaf.sharding, True)(leaf, position)
        return np.asarray(block.addressable_data(0))
    if position is None:
        return _from_shards(leaf)
    return _from_shards(_layer_slicer(leaf.sharding, False)(leaf, position))


def _get(tree: PyTree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _plan(model: ModelConfig, itemsize: int) -> list[tuple[str, TensorLayout, int | None, int]]:
    """(HF name, layout, logical layer or None, bytes) of every tensor, in HF's order (layer by layer)."""
    sizes = axis_sizes(model)
    layouts = model_layouts(model)
    stacked = [lay for lay in layouts if lay.stacked]
    head = [lay for lay in layouts if not lay.stacked and lay.path.startswith("embed")]
    tail = [lay for lay in layouts if not lay.stacked and lay not in head]

    def entry(layout, layer):
        name = layout.hf_name.format(i=layer) if layer is not None else layout.hf_name
        return name, layout, layer, int(np.prod(layout.hf_shape(sizes))) * itemsize

    return [
        *(entry(lay, None) for lay in head),
        *(entry(lay, i) for i in range(model.n_layers) for lay in stacked),
        *(entry(lay, None) for lay in tail),
    ]


def export_hf(
    params: PyTree,
    model: ModelConfig,
    out_dir: str | pathlib.Path,
    *,
    layer_order: Sequence[int] | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_position_embeddings: int = 4096,
    config_extra: dict | None = None,
) -> pathlib.Path:
    """Writes ``params`` (shardlib's pure dict, any sharding) as an HF checkpoint of ``hf_model_type(model)``.

    The family follows the model's options: ``Qwen2ForCausalLM`` with q/k/v
    biases, ``MistralForCausalLM`` with a sliding window, else ``LlamaForCausalLM``
    (rope scaling ``llama3`` included); importing the result gives ``model`` back.

    ``layer_order``: stored position -> logical layer of the stacked
    parameters (a pipeline's layout; default 0..L-1); HF layer i is written
    from the position holding logical layer i. ``dtype`` ("float32" or
    "bfloat16"; default ``model.param_dtype``) is what the files store. Files
    hold at most ``max_shard_bytes`` each (one tensor may exceed it alone).
    Returns ``out_dir``, which gets ``config.json`` and the weights.
    """
    out_dir = pathlib.Path(out_dir)
    dtype = dtype or model.param_dtype
    np_dtype = jax.numpy.dtype(dtype)
    order = np.arange(model.n_layers) if layer_order is None else np.asarray(layer_order)
    position = {int(logical): p for p, logical in enumerate(order)}
    plan = _plan(model, np_dtype.itemsize)
    files: list[list] = [[]]
    for item in plan:
        if files[-1] and sum(e[3] for e in files[-1]) + item[3] > max_shard_bytes:
            files.append([])
        files[-1].append(item)
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    )
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    sizes = axis_sizes(model)
    held: dict[tuple, np.ndarray] = {}  # the last layer block: a fused one serves the next rows too
    for name, entries in zip(names, files, strict=True):
        tensors = {}
        for hf_name, layout, layer, _ in entries:
            key = (layout.path, None if layer is None else position[layer])
            if key not in held:
                held = {key: _host_block(_get(params, layout.path), key[1])}
            tensors[hf_name] = np.ascontiguousarray(to_hf(layout, held[key], sizes).astype(np_dtype))
        if writer:
            save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    if writer:
        config = hf_config_from_model(
            model, dtype=dtype, max_position_embeddings=max_position_embeddings, extra=config_extra
        )
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(e[3] for e in plan)},
                "weight_map": {e[0]: name for name, entries in zip(names, files, strict=True) for e in entries},
            }
            (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


if __name__ == "__main__":  # the command moved with what it needs (restoring a run) to the training layer
    import shlex
    import sys

    new = ["python", "-m", "shardlib.training.hf_export", *sys.argv[1:]]
    print(f"error: python -m {__spec__.name} moved to python -m {new[2]}; run: {shlex.join(new)}", file=sys.stderr)
    raise SystemExit(2)
