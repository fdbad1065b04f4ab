"""shardlib: declarative SPMD sharding for JAX training.

What other projects import: meshes with five named axes, one ordered rule
table from logical axis names to mesh axes, and functions that apply it to
parameters, optimizer state and activations. Importing shardlib does not start
a JAX backend. ``shardlib.analysis.describe.describe`` tabulates where every parameter
lives (it is also ``python -m shardlib.analysis.describe``).
"""

from shardlib.core.mesh import (
    MESH_AXES,
    MeshSpec,
    build_mesh,
    load_mesh_spec,
    mesh_spec,
    prepare_devices,
)
from shardlib.core.rules import (
    PRESETS,
    Rules,
    ShardingError,
    ShardingIntent,
    compile_rules,
    format_rules,
    logical_to_sharding,
    logical_to_spec,
    preset_rules,
)
from shardlib.core.sharding import (
    ActivationSharding,
    logical_axes_from_state,
    match_logical_axes,
    optimizer_shardings,
    shard_tree,
    tree_shardings,
    tree_specs,
)

__all__ = [
    "MESH_AXES",
    "PRESETS",
    "ActivationSharding",
    "MeshSpec",
    "Rules",
    "ShardingError",
    "ShardingIntent",
    "build_mesh",
    "compile_rules",
    "format_rules",
    "load_mesh_spec",
    "logical_axes_from_state",
    "logical_to_sharding",
    "logical_to_spec",
    "match_logical_axes",
    "mesh_spec",
    "optimizer_shardings",
    "prepare_devices",
    "preset_rules",
    "shard_tree",
    "tree_shardings",
    "tree_specs",
]
