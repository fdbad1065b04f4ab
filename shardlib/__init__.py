"""shardlib: declarative SPMD sharding for JAX training.

What other projects import: meshes with named axes (the five parallel axes and
``data_replica``, or any ``jax.sharding.Mesh`` through mesh-axis aliases), one ordered rule table from
logical axis names to mesh axes, and functions that apply it to parameters
(Flax annotations read directly, T5X ``params_axes`` too, path patterns for the rest), optimizer and
train states, and activations. The strategies of ``shardlib.parallel`` are here
too (``STRATEGIES``: name -> module): the pipeline executor and its schedules,
attention over ``seq``, expert dispatch, the per-use reduction, DiLoCo and
compressed gradients; each is imported on first use. Importing shardlib does not start a JAX
backend. ``shardlib.analysis.describe.describe`` tabulates where every
parameter lives (it is also ``python -m shardlib.analysis.describe``).
"""

import importlib
import importlib.metadata
import typing

from shardlib.core.aliases import alias_logical_axes
from shardlib.core.flax_axes import (
    linen_output_constraints,
    logical_axes,
    logical_axes_from_state,
    unbox,
)
from shardlib.core.mesh import (
    MESH_AXES,
    MeshSpec,
    build_mesh,
    load_mesh_spec,
    mesh_spec,
    prepare_devices,
)
from shardlib.core.paths import is_logical_axes, map_logical_axes
from shardlib.core.patterns import match_logical_axes
from shardlib.core.rules import (
    PRESETS,
    Rules,
    ShardingError,
    ShardingIntent,
    ShardingWarning,
    compile_rules,
    format_rules,
    logical_to_sharding,
    logical_to_spec,
    preset_rules,
    rename_mesh_axes,
)
from shardlib.core.sharding import (
    ActivationSharding,
    shard_tree,
    tree_shardings,
    tree_specs,
)
from shardlib.core.state_sharding import (
    optimizer_shardings,
    shardings_like_params,
    train_state_shardings,
)

# The strategies' public names, imported on first use (a module __getattr__), so that ``import shardlib``
# stays the rules core's cost. Add a name here and it is exported (``__all__``, ``dir``, tests/test_exports.py).
STRATEGIES: dict[str, str] = {
    # pipelines: any stage functions under any schedule's tick table
    "pipeline_loss_and_grads": "shardlib.parallel.pipeline.executor",
    "pipeline_loss": "shardlib.parallel.pipeline.executor",
    "layer_order": "shardlib.parallel.pipeline.sends",
    "StageFunctions": "shardlib.parallel.pipeline.actions",
    "Schedule": "shardlib.parallel.pipeline.schedules",
    "make_schedule": "shardlib.parallel.pipeline.schedules",
    "TickTable": "shardlib.parallel.pipeline.table",
    "compile_table": "shardlib.parallel.pipeline.table",
    "PipelineSettings": "shardlib.parallel.pipeline.plan",
    "PipelinePlan": "shardlib.parallel.pipeline.plan",
    "plan_pipeline": "shardlib.parallel.pipeline.plan",
    "pipeline_axis": "shardlib.parallel.pipeline.plan",
    "stacked_stage_functions": "shardlib.parallel.pipeline.stacked",
    "linen_layer": "shardlib.parallel.pipeline.flax_layers",
    "nnx_layer": "shardlib.parallel.pipeline.flax_layers",
    "split_stacked": "shardlib.parallel.pipeline.flax_layers",
    "merge_stacked": "shardlib.parallel.pipeline.flax_layers",
    # the weight-use hook: what the per-use reduction and the zero-bubble split build on
    "WeightUseSpec": "shardlib.parallel.weight_use",
    "PlainWeightUse": "shardlib.parallel.weight_use",
    "WeightTap": "shardlib.parallel.weight_use",
    "tapped_weight_grads": "shardlib.parallel.weight_use",
    # attention over `seq`
    "AttentionPlan": "shardlib.parallel.attention",
    "make_attention": "shardlib.parallel.attention",
    "ring_attention": "shardlib.parallel.ring_attention",
    "ulysses_attention": "shardlib.parallel.ulysses_attention",
    "dot_product_attention": "shardlib.parallel.seq_attention",
    # experts over `expert`
    "moe_dispatch": "shardlib.parallel.experts",
    "router_top_k": "shardlib.parallel.expert_routing",
    "MoEStats": "shardlib.parallel.expert_routing",
    "expert_dispatch": "shardlib.parallel.experts",
    "expert_parallel_dispatch": "shardlib.parallel.experts",
    "dispatch_buffer_bytes": "shardlib.parallel.experts",
    "dropless_moe_dispatch": "shardlib.parallel.dropless_experts",
    "dropless_dispatch": "shardlib.parallel.dropless_experts",
    # the per-use reduction (FSDP and TP gradients at the byte minimum)
    "ReducedWeightUse": "shardlib.parallel.reduction",
    "reduced_weight_use": "shardlib.parallel.reduction",
    "use_specs": "shardlib.parallel.reduction",
    "reduce_deferred_params": "shardlib.parallel.reduction",
    "LinenReduction": "shardlib.parallel.reduced_dense",
    # DiLoCo and local SGD across replica groups
    "OuterSettings": "shardlib.parallel.diloco",
    "diloco_optimizer": "shardlib.parallel.diloco",
    "outer_optimizer": "shardlib.parallel.diloco",
    "outer_update": "shardlib.parallel.diloco",
    "split_replicas": "shardlib.parallel.diloco",
    "per_replica": "shardlib.parallel.diloco",
    "replica_count": "shardlib.parallel.diloco",
    "replica_mean": "shardlib.parallel.diloco",
    "average_moments": "shardlib.parallel.diloco",
    # compressed gradient all-reduces with error feedback
    "GradCompression": "shardlib.parallel.compression",
    "make_grad_compression": "shardlib.parallel.compression",
    "compressed_mean": "shardlib.parallel.compression",
}
"""The strategies' public names -> the module each is imported from on first use."""

try:
    __version__ = importlib.metadata.version("shardlib")  # pyproject.toml's, from the installed package's metadata
except importlib.metadata.PackageNotFoundError:  # the checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [  # the rules core, imported now; then the strategies' names
    "MESH_AXES",
    "PRESETS",
    "STRATEGIES",
    "ActivationSharding",
    "MeshSpec",
    "Rules",
    "ShardingError",
    "ShardingIntent",
    "ShardingWarning",
    "alias_logical_axes",
    "build_mesh",
    "compile_rules",
    "format_rules",
    "is_logical_axes",
    "linen_output_constraints",
    "load_mesh_spec",
    "logical_axes",
    "logical_axes_from_state",
    "logical_to_sharding",
    "logical_to_spec",
    "map_logical_axes",
    "match_logical_axes",
    "mesh_spec",
    "optimizer_shardings",
    "prepare_devices",
    "preset_rules",
    "rename_mesh_axes",
    "shard_tree",
    "shardings_like_params",
    "train_state_shardings",
    "tree_shardings",
    "tree_specs",
    "unbox",
]
__all__ += list(STRATEGIES)


def __getattr__(name: str) -> typing.Any:
    """A strategy's public name, imported from its module on first use (then cached here)."""
    if name not in STRATEGIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(STRATEGIES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *STRATEGIES})
