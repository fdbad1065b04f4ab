"""Every parameter's sharding, per preset, equals a table checked into tests/golden/.

A rule change that silently re-shards something fails here. After an
intended change, regenerate with SHARDLIB_UPDATE_GOLDEN=1 and review the diff.
"""

import os
import pathlib

import pytest

from shardlib.analysis.describe import describe, golden_table
from shardlib.core.rules import PRESETS, preset_rules
from shardlib.training.config import load_config
from shardlib.training.train_state import abstract_model
from tests.support import mesh_of

GOLDEN = pathlib.Path(__file__).parent / "golden"
MESHES = {
    "dp": {"data": 8},
    "fsdp": {"data": 8},
    "tp": {"data": 4, "model": 2},
    "fsdp_tp": {"data": 4, "model": 2},
    "hsdp": {"data_replica": 2, "data": 4},
    "hsdp_tp": {"data_replica": 2, "data": 2, "model": 2},
}
CONFIGS = ["tiny", "small"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sharding_matches_golden(config, preset):
    model = abstract_model(load_config(f"configs/{config}.yaml").model)
    mesh = mesh_of(**MESHES[preset])
    table = golden_table(describe(model.params, model.logical_axes, preset_rules(preset), mesh))
    path = GOLDEN / f"{config}-{preset}.txt"
    if os.environ.get("SHARDLIB_UPDATE_GOLDEN"):
        path.write_text(table)
    assert path.exists(), f"no golden file {path}; run with SHARDLIB_UPDATE_GOLDEN=1 to create it"
    assert table == path.read_text(), f"sharding of configs/{config}.yaml under {preset} changed; see {path}"


def test_every_preset_has_a_golden_mesh():
    assert set(MESHES) == set(PRESETS)
