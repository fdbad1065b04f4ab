"""Model zoo. Models annotate parameters and activations with logical axis names only.

They import nothing from shardlib and read no global state: the caller maps
logical names to mesh axes and passes a `shard` callable for activations.
"""

from collections.abc import Callable
from typing import Any

from flax import nnx

from shardlib.models.transformer import ShardFn, Transformer, no_shard

__all__ = ["MODELS", "ShardFn", "Transformer", "create_model", "no_shard"]

# cfg.name -> constructor taking (cfg, *, rngs).
MODELS: dict[str, Callable[..., nnx.Module]] = {"transformer": Transformer}


def create_model(cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model named by `cfg.name` (a `ModelConfig`).

    Creating parameters with sharding metadata needs a mesh context unless
    eager sharding is off; see `nnx.use_eager_sharding`.
    """
    try:
        model_cls = MODELS[cfg.name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model name {cfg.name!r}; known models: {known}") from None
    return model_cls(cfg, rngs=rngs)
