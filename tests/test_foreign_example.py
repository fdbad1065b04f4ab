"""examples/foreign_models.py runs, and shards what it says it shards.

The example itself raises when sharded training differs from one device by
more than 1e-5 of a leaf's scale; here we also check that the parameters it
compares were really split, over the project's own mesh axes for the Linen
model and shardlib's for the NNX one.
"""

import jax
from jax.sharding import PartitionSpec as P

from examples.foreign_models import TOLERANCE, main


def test_example_trains_both_models_sharded_like_one_device():
    results = main(jax.devices()[:4])
    for name in ("linen", "nnx"):
        assert results[name]["loss_error"] <= TOLERANCE
        assert results[name]["param_error"] <= TOLERANCE
    linen = results["linen"]["specs"]["params"]
    assert linen["block_0"]["query"]["kernel"] == P("fsdp", "tp", None)  # (embed, heads, kv)
    assert linen["embed"]["embedding"] == P("tp", "fsdp")  # (vocab, embed)
    assert linen["pos_embed"] == P(None, "fsdp")  # the project's own rule: max_len replicated
    assert linen["block_0"]["pre_mlp_norm"]["scale"] == P("fsdp")  # from a pattern
    nnx_block = results["nnx"]["specs"]["blocks"][0]
    assert nnx_block["q"]["kernel"] == P("data", "model")  # (embed, joined_kv): heads x head_dim over model
    assert nnx_block["o"]["kernel"] == P("model", "data")
    assert nnx_block["q_norm"]["scale"] == P(None)  # from a pattern
