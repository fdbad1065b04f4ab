"""DiLoCo and local SGD settings refused before any step runs, and how (``shardlib.parallel.diloco``).

Bad ``outer`` keys name themselves in one line; FSDP left nothing to shard over inside the replicas is
refused by the compatibility table; averaging Adam moments an optimizer does not keep is refused; an
overlapped run's mixing default. None of these compiles a step: the runs, and the refusal of a checkpoint
of another replica count, are in ``tests/test_diloco.py``.
"""

from __future__ import annotations

import optax
import pytest

from shardlib.parallel import compat
from shardlib.parallel.compat import IncompatibleFeatures
from shardlib.training.config import ConfigError, validate_config
from shardlib.training.parallel_plan import outer_settings
from shardlib.training.setup import setup_training
from tests.diloco_support import (
    diloco_config,
)
from tests.support import mesh_of, tiny_config

# --------------------------------------------------------------------------- what is refused, and how


@pytest.mark.parametrize(
    ("sharding", "axes", "sizes"), [("fsdp", ["data"], {"data": 2}), ("fsdp_tp", ["data", "expert"], {"data": 2})]
)
def test_fsdp_with_nothing_left_to_shard_over_is_refused_by_the_table(sharding, axes, sizes):
    cfg = diloco_config(sharding=sharding, outer={"replica_axes": axes})
    with pytest.raises(IncompatibleFeatures) as err:
        setup_training(cfg, mesh_of(**sizes))
    assert compat.REFUSED_WHEN[(sharding, "diloco")][1] in str(err.value)
    assert "outer.algorithm=diloco (outer.replica_axes=" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("outer", "message"),
    [
        ({"algorithm": "local_sgd", "learning_rate": 0.5}, "outer: local_sgd averages the replicas"),
        ({"algorithm": "diloco", "inner_steps": 0}, "outer.inner_steps: Input should be greater than 0"),
        (
            {"algorithm": "diloco", "replica_axes": ["model"]},
            "outer.replica_axes.0: Input should be 'data', 'data_replica' or 'expert'",
        ),
        ({"algorithm": "diloco", "replica_axes": []}, "outer: Value error, replica_axes must name each mesh axis once"),
        ({"algorithm": "diloco", "compression": "fp8"}, "outer.compression: Input should be 'none', 'bf16' or 'int8'"),
        ({"algorithm": "diloco", "inner_steps": 4, "fragments": 3}, "outer: Value error, fragments=3 must divide"),
        (
            {"algorithm": "diloco", "overlap_steps": 1, "average_moments": "first"},
            "outer: Value error, average_moments with overlap_steps=1 is not built",
        ),
        (
            {"algorithm": "diloco", "overlap_steps": 2},
            "outer.overlap_steps: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_outer_settings_name_their_key(outer, message):
    raw = tiny_config().model_dump(mode="json") | {"outer": outer}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert message.replace("Value error, ", "") in str(err.value)


@pytest.mark.parametrize("moments", ["first", "both"])
def test_averaging_the_moments_of_an_optimizer_without_them_is_refused(moments):
    """optax.sgd keeps no Adam moments: averaging them would do nothing, without a word."""
    cfg = diloco_config(outer={"average_moments": moments})
    with pytest.raises(ValueError, match=rf"outer.average_moments={moments} averages the inner optimizer's Adam"):
        setup_training(cfg, mesh_of(data=4), optimizer=optax.sgd(0.1, momentum=0.9))
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))  # found inside a chain
    assert setup_training(cfg, mesh_of(data=4), optimizer=adam).plan.outer.settings.moments == moments


def test_an_overlapped_run_keeps_half_of_each_replicas_overlapped_step():
    """outer.mixing unset under overlap_steps 1 reaches the strategy as the paper's alpha (test_config)."""
    cfg = diloco_config(outer={"overlap_steps": 1})
    assert outer_settings(cfg).mixing == 0.5
    assert outer_settings(diloco_config(outer={"overlap_steps": 1, "mixing": 0.0})).mixing == 0.0
