"""Every sharding preset on 8 devices trains exactly like one device (fp32, 1e-5).

Three optimizer steps through the trainer's own jitted step, then the
gradients at the resulting parameters: a rule that sharded something wrongly,
or a collective XLA got wrong, shows up as a different loss or gradient.
"""

import functools

import jax
import numpy as np
import pytest

from shardlib.data import load_token_splits
from shardlib.trainer import setup_training
from tests.support import mesh_of, tiny_config

STEPS = 3
TOLERANCE = 1e-5

CASES = {
    # preset, mesh sizes, extra config
    "dp": ("dp", {"data": 8}, {}),
    "fsdp": ("fsdp", {"data": 8}, {}),
    "tp": ("tp", {"data": 4, "model": 2}, {}),
    # Gradient accumulation must not change the result either.
    "fsdp_tp_accum": ("fsdp_tp", {"data": 4, "model": 2}, {"grad_accum": 2}),
}


def run_steps(cfg, mesh):
    """Losses of STEPS training steps, then (loss, grads) at the final parameters, on the host."""
    run = setup_training(cfg, mesh)
    train_tokens, _ = load_token_splits(cfg.data)
    loader = run.loader(train_tokens, seed=cfg.seed)
    params, opt_state = run.init_state()
    losses = []
    for _ in range(STEPS):
        params, opt_state, metrics = run.train_step(params, opt_state, loader.next())
        losses.append(float(metrics["loss"]))
    loss, grads = run.grads(params, loader.next())
    return np.array(losses), float(loss), jax.device_get(grads), jax.device_get(params)


@functools.cache
def reference():
    return run_steps(tiny_config(), mesh_of(devices=1))


@pytest.mark.parametrize("case", list(CASES))
def test_preset_matches_single_device(case):
    preset, sizes, extra = CASES[case]
    ref_losses, ref_loss, ref_grads, ref_params = reference()
    cfg = tiny_config(sharding=preset, **extra)
    mesh = mesh_of(**sizes)
    losses, loss, grads, params = run_steps(cfg, mesh)

    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOLERANCE)
    assert abs(loss - ref_loss) <= TOLERANCE
    assert ref_losses[-1] < ref_losses[0], "the reference did not train"
    for path, (g, g_ref) in _paired(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=TOLERANCE, err_msg=f"gradient of {path}")
    for path, (p, p_ref) in _paired(params, ref_params):
        np.testing.assert_allclose(p, p_ref, rtol=0, atol=TOLERANCE, err_msg=f"parameter {path}")


def test_sharded_state_is_actually_sharded():
    """Guards the test above against comparing two replicated runs."""
    run = setup_training(tiny_config(sharding="fsdp_tp"), mesh_of(data=4, model=2))
    params, opt_state = run.init_state()
    q = params["layers"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None)
    assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)
    mu = opt_state[1][0].mu["layers"]["q"]
    assert mu.sharding.spec == q.sharding.spec


def _paired(tree, ref):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_ref = jax.tree.leaves(ref)
    assert len(flat) == len(flat_ref)
    for (path, leaf), leaf_ref in zip(flat, flat_ref, strict=True):
        yield jax.tree_util.keystr(path), (np.asarray(leaf), np.asarray(leaf_ref))
