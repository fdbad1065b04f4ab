"""shardlib: declarative SPMD sharding for JAX training.

What other projects import: meshes with named axes (the five parallel axes and
``data_replica``, or any ``jax.sharding.Mesh`` through mesh-axis aliases), one ordered rule table from
logical axis names to mesh axes, and functions that apply it to parameters
(Flax annotations read directly, path patterns for the rest), optimizer and
train states, and activations. Importing shardlib does not start a JAX
backend. ``shardlib.analysis.describe.describe`` tabulates where every
parameter lives (it is also ``python -m shardlib.analysis.describe``).
"""

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

__all__ = [
    "MESH_AXES",
    "PRESETS",
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
