"""A config resolved on mesh axis sizes, without devices: what the analytic model and planner read.

Everything here is computed from the rule table with plain axis sizes (no
``jax.sharding.Mesh``), so the planner can evaluate a 64-GPU mesh on a laptop.
The same resolution code as training (``shardlib.core.rules.logical_to_spec``)
decides every parameter's shards and raises the same ``ShardingError`` when a
dimension does not divide, so a layout that resolves here also builds there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec

from shardlib.core.mesh import MESH_AXES
from shardlib.core.rules import ShardingError, check_mesh_fits_intent, logical_to_spec, preset_rules, spec_axes
from shardlib.core.sharding import is_logical_axes, path_str, tree_specs
from shardlib.training.config import Config, ModelConfig

# Mesh axes that split the tokens of a step: gradients are reduced over them.
TOKEN_AXES = ("data_replica", "data", "expert", "seq")


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """One parameter leaf: its global shape and bytes, logical axes and mesh axes."""

    path: str
    shape: tuple[int, ...]
    itemsize: int
    logical_axes: tuple[str | None, ...]
    mesh_axes: tuple[str, ...]  # every mesh axis of its PartitionSpec
    shards: int  # product of their sizes
    expert_axes: tuple[str, ...] = ()  # the mesh axes of its ``experts`` dimension (MoE experts a device owns)

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def bytes_per_device(self) -> float:
        return self.bytes / self.shards

    @property
    def scanned(self) -> bool:
        """Stacked over layers and applied by the layer scan (one slice per iteration)."""
        return bool(self.logical_axes) and self.logical_axes[0] == "layers"


@dataclasses.dataclass(frozen=True)
class Layout:
    """``cfg`` with preset ``sharding`` on a mesh of ``sizes``."""

    cfg: Config
    sizes: dict[str, int]
    sharding: str
    params: tuple[ParamLayout, ...]
    batch_axes: tuple[str, ...]  # mesh axes the batch dimension is split over
    seq_shards: int  # the sequence (length) split, from the rules
    heads_shards: int  # query heads per device = n_heads / heads_shards
    kv_shards: int  # the same split: the fused qkv weight keeps a kv head's queries with it
    mlp_shards: int
    vocab_shards: int

    @property
    def devices(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def microbatches(self) -> int:
        """Gradient accumulation steps: how often the step reduces gradients."""
        return self.cfg.grad_accum

    @property
    def pipeline_microbatches(self) -> int:
        """Microbatches of the pipeline schedule (``cfg.pipeline``), 1 without a pipeline."""
        pipeline = getattr(self.cfg, "pipeline", None)
        return pipeline.microbatches if pipeline is not None and self.sizes["pipe"] > 1 else 1

    @property
    def forward_passes(self) -> int:
        """Microbatch forward passes per step: accumulation steps times pipeline microbatches."""
        return self.microbatches * self.pipeline_microbatches

    @property
    def layers_per_device(self) -> int:
        """Layers a device runs: all of them, or its stages' share with a pipeline."""
        return self.cfg.model.n_layers // self.sizes["pipe"]

    @property
    def batch_shards(self) -> int:
        return math.prod(self.sizes[a] for a in self.batch_axes)

    @property
    def rows_per_device(self) -> int:
        """Sequences of one microbatch on one device."""
        return self.cfg.batch_size // (self.forward_passes * self.batch_shards)

    @property
    def tokens_per_device(self) -> int:
        """Tokens of one microbatch on one device."""
        return self.rows_per_device * self.cfg.seq_len // self.seq_shards

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Mesh axes (size > 1) over which devices see different tokens: the gradient reduction group."""
        return tuple(a for a in MESH_AXES if a in TOKEN_AXES and self.sizes[a] > 1)

    @property
    def work_shards(self) -> int:
        """Into how many parts the step's FLOPs are split (a pipeline's stages each run their
        layers); other devices repeat work."""
        return self.batch_shards * self.seq_shards * self.heads_shards * self.sizes["pipe"]

    @property
    def param_bytes(self) -> int:
        return sum(p.bytes for p in self.params)

    @property
    def param_bytes_per_device(self) -> float:
        return sum(p.bytes_per_device for p in self.params)

    def unused_axes(self) -> list[str]:
        """Mesh axes of size > 1 that shard neither parameters nor tokens: their devices repeat work."""
        used = {a for p in self.params for a in p.mesh_axes} | set(self.batch_axes)
        if self.seq_shards > 1:
            used.add("seq")
        return [a for a, n in self.sizes.items() if n > 1 and a not in used]


@functools.lru_cache(maxsize=32)
def _abstract_params(model_json: str):
    from shardlib.training.train_state import abstract_model

    model = abstract_model(ModelConfig.model_validate_json(model_json))
    return model.params, model.logical_axes


def abstract_params(cfg: ModelConfig):
    """(params as ShapeDtypeStructs, logical axes) of a model config, cached per config."""
    return _abstract_params(json.dumps(cfg.model_dump(mode="json"), sort_keys=True))


def _shards(names: tuple[str, ...], rules, sizes: Mapping[str, int], shape: tuple[int, ...]) -> int:
    spec = logical_to_spec(names, rules, sizes, shape=shape)
    return math.prod(sizes[a] for a in spec_axes(spec))


def resolve_layout(cfg: Config, sizes: Mapping[str, int], sharding: str | None = None) -> Layout:
    """Resolves ``cfg`` (preset ``sharding``, default the config's) on axis ``sizes``.

    Raises ``ShardingError`` (a ``ValueError``) when a parameter, the batch or
    a microbatch does not divide over the mesh, exactly as training would.
    """
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    sharding = sharding or cfg.sharding
    check_mesh_fits_intent(sharding, sizes)
    rules = preset_rules(sharding)
    params, logical = abstract_params(cfg.model)
    specs = tree_specs(params, logical, rules, sizes)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = jax.tree.leaves(logical, is_leaf=is_logical_axes)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    layouts = []
    for (path, leaf), axes, spec in zip(flat, flat_axes, flat_specs, strict=True):
        mesh_axes = spec_axes(spec)
        layouts.append(
            ParamLayout(
                path_str(path),
                tuple(leaf.shape),
                np.dtype(leaf.dtype).itemsize,
                tuple(axes),
                mesh_axes,
                math.prod(sizes[a] for a in mesh_axes),
                spec_axes(PartitionSpec(spec[axes.index("experts")])) if "experts" in axes else (),
            )
        )
    micro = cfg.batch_size // cfg.grad_accum
    try:
        batch_spec = logical_to_spec(("batch", "length"), rules, sizes, shape=(micro, cfg.seq_len))
        logical_to_spec(("batch", "length"), rules, sizes, shape=(cfg.batch_size, cfg.seq_len))
    except ShardingError as err:
        raise ShardingError(
            f"batch_size={cfg.batch_size} with grad_accum={cfg.grad_accum} ({micro} sequences per microbatch) "
            f"and seq_len={cfg.seq_len} do not divide over the mesh: {err}"
        ) from err
    batch_axes = spec_axes(PartitionSpec(batch_spec[0]))
    seq_axes = spec_axes(PartitionSpec(batch_spec[1]))
    m = cfg.model
    return Layout(
        cfg=cfg,
        sizes=sizes,
        sharding=sharding,
        params=tuple(layouts),
        batch_axes=batch_axes,
        seq_shards=math.prod(sizes[a] for a in seq_axes),
        heads_shards=_shards(("heads",), rules, sizes, (m.n_heads,)),
        kv_shards=_shards(("kv_heads",), rules, sizes, (m.n_kv_heads,)),
        mlp_shards=_shards(("mlp",), rules, sizes, (m.d_ff,)),
        vocab_shards=_shards(("vocab",), rules, sizes, (m.vocab_size,)),
    )
