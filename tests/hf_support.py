"""What the Hugging Face tests share: a model's logits, a fixture's tensors, bitwise parameter equality."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from shardlib.interop.hf_import import tensor_files
from shardlib.training.train_state import abstract_model


def logits_of(cfg, params, tokens) -> np.ndarray:
    """The model of ``cfg`` with ``params`` on ``tokens``: its logits, jitted."""
    graphdef = abstract_model(cfg).graphdef
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


def fixture_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face checkpoint directory, by its HF name."""
    tensors = {}
    for path in sorted(set(tensor_files(hf_dir).values())):
        tensors |= load_file(str(path))
    return tensors


def assert_params_equal(a, b):
    """Same dtypes and the same bytes, leaf by leaf (named on failure)."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), jax.tree_util.keystr(path)
