"""examples/linen_pipeline.py runs: a foreign Linen decoder under ZB-V over pipe 2 x data 2 x seq 2, like one device."""

import jax
import numpy as np

from examples.linen_pipeline import TOLERANCE, main
from tests.support import assert_trees_close


def test_linen_decoder_trains_under_zb_v_with_ring_attention_like_one_device():
    results = main(jax.devices()[:8], steps=2)
    assert len(results["losses"]) == 2
    np.testing.assert_allclose(results["losses"], results["ref_losses"], rtol=TOLERANCE)
    assert results["losses"][1] < results["losses"][0]  # the step trained
    assert_trees_close(results["last_grads"], results["last_ref_grads"], rel=TOLERANCE, what="gradient")
