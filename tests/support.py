"""Shared test fixtures: tiny configs (compile time dominates on 2 cores) and meshes."""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
from collections.abc import Callable
from typing import TypeVar

import chex
import jax
import numpy as np

from shardlib.core.mesh import build_mesh, mesh_spec
from shardlib.training.config import Config, validate_config
from shardlib.training.data import load_token_splits
from shardlib.training.setup import setup_training

T = TypeVar("T")

TINY_MODEL = {
    "vocab_size": 256,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 64,
}


def tiny_config(run_dir: str = "runs/test", **overrides) -> Config:
    """A ~40K-parameter config over the stdlib corpus; overrides are top-level keys."""
    raw = {
        "model": dict(TINY_MODEL),
        "steps": 10,
        "batch_size": 16,
        "seq_len": 16,
        "run_dir": str(run_dir),
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 1,
        "optimizer": {"lr": 1e-2, "warmup_steps": 2},
        "checkpoint": {"every": 5, "keep": 3, "async_save": True},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return validate_config(raw)


def mesh_of(devices: int | None = None, **sizes) -> jax.sharding.Mesh:
    """A mesh over the first ``devices`` devices (default: the product of sizes)."""
    count = 1
    for size in sizes.values():
        count *= size
    return build_mesh(mesh_spec(**sizes), jax.devices()[: devices or count])


def assert_trees_close(actual, expected, rel: float = 1e-5, floor: float = 1e-12, what: str = "leaf") -> None:
    """Every leaf of ``actual`` is within ``rel`` of its own scale of the matching leaf of ``expected``.

    Per leaf: ``max|a - b| <= rel * max|b| + floor``. A single absolute tolerance
    for a whole tree lets small leaves through unchecked (``atol=1e-5`` passes a 4%
    error on a gradient of magnitude 2e-4); scaling by each leaf's own largest
    magnitude holds every leaf to the same relative precision, and ``floor`` only
    keeps an all-zero leaf from demanding bitwise equality. The trees must have the
    same structure and shapes (chex checks both). On failure the message names every
    leaf that is off, with its error, its scale and their ratio.
    """
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_shapes(actual, expected)
    flat = jax.tree_util.tree_flatten_with_path(actual)[0]
    failures = []
    for (path, a), b in zip(flat, jax.tree.leaves(expected), strict=True):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        error = float(np.max(np.abs(a - b), initial=0.0))
        scale = float(np.max(np.abs(b), initial=0.0))
        allowed = rel * scale + floor
        if not error <= allowed:  # also catches NaN
            failures.append(
                f"{what} {jax.tree_util.keystr(path)}: max|error| {error:.3g} > {allowed:.3g} "
                f"(= {rel:g} x scale max|expected| {scale:.3g} + {floor:g}); relative error {error / (scale or 1):.3g}"
            )
    assert not failures, f"{len(failures)} of {len(flat)} leaves differ:\n" + "\n".join(failures)


# The same network's loss computed two ways (the pipeline's mean of microbatch means, the eval
# step's mean over the batch) sums in different orders and on different CPUs' vector widths:
# fp32 agrees to a few ulps (about 4.8e-7 each at a loss of 5). A layer order that differs
# between the two moves the loss by about 1e-3 relative (3.2192 against 3.2144 in issue 10).
SAME_LOSS_REL = 1e-6


def assert_same_loss(actual: float, expected: float) -> None:
    """``actual`` and ``expected`` are one loss up to fp32 summation order (``SAME_LOSS_REL`` of its size)."""
    actual, expected = float(actual), float(expected)
    assert abs(actual - expected) <= SAME_LOSS_REL * abs(expected), (
        f"losses differ by {abs(actual - expected):.3g} ({actual!r} against {expected!r}); "
        f"allowed {SAME_LOSS_REL:g} of the loss, a few fp32 ulps"
    )


def first_batch(cfg: Config, mesh: jax.sharding.Mesh):
    """(setup, the run's first training batch, fresh params) for ``cfg`` on ``mesh``."""
    run = setup_training(cfg, mesh)
    tokens, _ = load_token_splits(cfg.data)
    params, _ = run.init_state()
    return run, run.loader(tokens, seed=cfg.seed).next(), params


def assert_trees_within_rounding(actual, expected, rounded, *, times: float, rel: float, what: str = "leaf") -> None:
    """Every leaf of ``actual`` is no further from ``expected`` than ``times`` the leaf of ``rounded`` is.

    ``rounded``: ``expected`` computed as inexactly as ``actual`` may be (one device in bfloat16,
    for a bfloat16 run held to the float32 reference). Per leaf, in its L2 norm:
    ``||a - b|| <= times * ||c - b|| + rel * ||b||``. A run that rounds in another order makes
    another draw of the same error, of about the same norm (a bfloat16 run's leaves: 0.3-5% of
    the leaf, sharded against one device within 0.8-1.4 times); a systematic error adds its
    own norm on top (a gradient 1% too large: 1% of the leaf). The largest element, which
    ``assert_trees_close`` reads, is one element's rounding and varies more between draws.
    Structures and shapes must match (chex); the message names every leaf that is off.
    """
    chex.assert_trees_all_equal_structs(actual, expected, rounded)
    chex.assert_trees_all_equal_shapes(actual, expected, rounded)
    flat = jax.tree_util.tree_flatten_with_path(actual)[0]
    failures = []
    for (path, a), b, c in zip(flat, jax.tree.leaves(expected), jax.tree.leaves(rounded), strict=True):
        a, b, c = (np.asarray(x, np.float64).ravel() for x in (a, b, c))
        error, off, size = np.linalg.norm(a - b), np.linalg.norm(c - b), np.linalg.norm(b)
        allowed = times * off + rel * size
        if not error <= allowed:  # also catches NaN
            failures.append(
                f"{what} {jax.tree_util.keystr(path)}: ||error|| {error:.3g} > {allowed:.3g} (= {times:g} x "
                f"{off:.3g}, the rounded computation's, + {rel:g} x ||expected|| {size:.3g}); "
                f"relative {error / (size or 1):.3g} against {off / (size or 1):.3g}"
            )
    assert not failures, f"{len(failures)} of {len(flat)} leaves differ:\n" + "\n".join(failures)


def shared_result(key: object, compute: Callable[[], T]) -> T:
    """``compute()``, computed once per pytest run and shared by its test processes (the xdist workers).

    The pickled result is kept under a digest of ``repr(key)`` in ``SHARDLIB_TEST_SHARED_DIR``
    (tests/conftest.py makes one per run); ``key`` must name everything the result depends on, and
    ``compute`` must be deterministic. Two processes asking at once both compute it and the last
    to finish replaces the other's file whole; without the directory, ``compute()`` runs each time.
    """
    directory = os.environ.get("SHARDLIB_TEST_SHARED_DIR")
    if not directory:
        return compute()
    path = pathlib.Path(directory) / f"{hashlib.sha256(repr(key).encode()).hexdigest()}.pickle"
    if path.exists():
        return pickle.loads(path.read_bytes())
    value = compute()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(pickle.dumps(value))
    partial.replace(path)
    return value
