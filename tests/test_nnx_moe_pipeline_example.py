"""examples/nnx_moe_pipeline.py: the NNX MoE model under expert parallelism inside a 1F1B pipeline, like one device.

One run of the example (module fixture: both programs compile once) on
dp 2 x stage 2 x ep 2, against the same two AdamW steps on one device:
* each step's loss, and every gradient leaf within 1e-5 of its own scale
  (the router's included: its load-balancing and z losses ride in the
  activation pytree, so they must reach it through the pipeline's backward);
* the experts' all-to-alls run inside the pipeline's stages, over ``ep`` and
  nothing else, and the one-device program has none;
* the experts' gradients come out split over ``stage`` and ``ep``, as the
  weights are (owned by ``ep``: reduced over ``dp`` only).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from examples.nnx_moe_pipeline import MESH, STEPS, main
from tests.support import assert_trees_close

REL = 1e-5  # fp32: the loss and each gradient leaf, relative to its own scale


@pytest.fixture(scope="module")
def results():
    return main(jax.devices()[:8], check=False)  # compared here, leaf by leaf


def test_each_steps_loss_matches_one_device(results):
    assert len(results["losses"]) == STEPS
    for step, (loss, ref) in enumerate(zip(results["losses"], results["reference_losses"], strict=True)):
        assert abs(loss - ref) <= REL * abs(ref), (step, loss, ref)


def test_each_steps_every_gradient_matches_one_device(results):
    assert len(results["grads"]) == STEPS
    for got, want in zip(results["grads"], results["reference_grads"], strict=True):
        assert_trees_close(got, want, rel=REL, what="gradient")


def test_experts_all_to_alls_run_over_ep_inside_the_pipeline(results):
    """Branching is ``select`` on CPU (collectives inside the stages), so each branch the 1F1B table uses is
    traced once: forward+embed and forward+loss hold one layer's two all-to-alls (out, back) each; backward
    and backward+embed four (the recomputed forward's two and their transposes): 2 x 2 + 2 x 4."""
    assert results["all_to_alls"] == 12
    assert results["reference_all_to_alls"] == 0
    ids = np.arange(8).reshape(tuple(MESH.values()))  # logical device ids, in the mesh's order
    ep_groups = np.moveaxis(ids, list(MESH).index("ep"), -1).reshape(-1, MESH["ep"])
    expected = "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in sorted(ep_groups.tolist())) + "}"
    assert results["all_to_all_groups"] == {expected}  # {{0,1},{2,3},{4,5},{6,7}}: ep peers only


def test_experts_gradients_stay_split_over_stage_and_ep(results):
    specs = results["expert_grad_specs"]
    assert specs["w_in"] == P("stage", "ep", None, None)  # (stack, num_experts, model_dim, ffn)
    assert specs["w_out"] == P("stage", "ep", None, None)
    assert specs["b_in"] == P("stage", "ep", None)
    assert specs["b_out"] == P("stage", "ep", None)
