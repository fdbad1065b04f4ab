"""examples/linen_fsdp_tp.py: a foreign Linen decoder under fsdp_tp matches one device and moves the minimum.

The example raises when training differs from one device by more than 1e-5 of a leaf's scale;
here we also hold its bytes, counted from the compiled program, to 1.02x the analytic minimum
on every axis, and the same model without the reduction to more.
"""

import jax

from examples.linen_fsdp_tp import TOLERANCE, main


def test_the_linen_decoder_under_fsdp_tp_matches_one_device_at_the_minimum_bytes():
    results = main(jax.devices()[:8])
    assert results["loss_error"] <= TOLERANCE and results["grad_error"] <= TOLERANCE
    assert all(ratio <= 1.02 for ratio in results["ratios"].values()), results["ratios"]
    assert results["plain"]["data"] > 1.5 * results["reduced"]["data"], results
    assert results["plain"]["model"] >= results["reduced"]["model"], results
    # Only the model's own RMSNorm scales are left to the partitioner (replicated: one all-reduce is their minimum).
    assert set(results["left"]) == {"final_norm", "layers/attn_norm", "layers/ffn_norm"}
