"""Shared test fixtures: tiny configs (compile time dominates on 2 cores) and meshes."""

from __future__ import annotations

import jax

from shardlib.config import Config, validate_config
from shardlib.mesh import build_mesh, mesh_spec

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
