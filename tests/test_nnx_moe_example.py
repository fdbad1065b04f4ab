"""examples/nnx_moe.py runs, and is expert-parallel where it says it is.

The example itself raises when the loss or a gradient of expert-parallel
training differs from one device by more than 1e-5 of a leaf's scale; here we
also check that the experts' weights were really split over the project's
``ep`` axis, that the compiled step moves tokens with all-to-alls (two
forward and two backward in the scanned layer) and one device's none, and
that capacity dropped the same pairs on both.
"""

import jax
from jax.sharding import PartitionSpec as P

from examples.nnx_moe import TOLERANCE, main


def test_example_trains_the_nnx_moe_expert_parallel_like_one_device():
    results = main(jax.devices()[:8])
    assert results["loss_error"] <= TOLERANCE
    assert results["grad_error"] <= TOLERANCE
    specs = results["expert_specs"]
    assert specs["w_in"] == P(None, "ep", None, None)  # (stack, num_experts, model_dim, ffn)
    assert specs["b_out"] == P(None, "ep", None)
    assert results["all_to_alls"] == 4 and results["reference_all_to_alls"] == 0
    assert all(d > 0 for d in results["dropped"]), "capacity 1.5 should drop pairs here"
    assert results["dropped"] == results["reference_dropped"]
