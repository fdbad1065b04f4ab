"""Every sharding preset on 8 devices trains exactly like one device (fp32, 1e-5 of each leaf's scale).

Three optimizer steps through the trainer's own jitted step, then the
gradients at the resulting parameters: a rule that sharded something wrongly,
or a collective XLA got wrong, shows up as a different loss or gradient.
Every compared step runs at the peak learning rate (no warmup), so the
parameters after them test the update, not only the initialisation.

AdamW's eps is 1e-3 here, not 1e-8. At step 1 AdamW moves an element by
lr * g / (|g| + eps); for an element whose gradient is float32 rounding noise
(|g| ~ 1e-8, a few ULPs of the leaf's largest gradient), |d update / d g| is up
to lr / eps, so eps = 1e-8 turns a 1e-7 relative difference in the gradient
(what summing in another order gives) into a difference of order lr in the
parameter: 2e-4 of the leaf's scale measured, which says nothing about the
sharding. With eps = 1e-3 the sensitivity is at most lr / eps = 10: gradients
that agree to ~1e-6 relative (max|g| ~ 4e-3) move parameters alike to
3 steps x 10 x 4e-9 ~ 1e-7, well inside 1e-5 of their scale (~0.1 to 1). A
large eps also keeps the update proportional to the gradient (AdamW with a
tiny eps is blind to a gradient scaled by a constant), so a wrongly reduced
gradient changes the parameters.
"""

import functools
import importlib
from unittest import mock

import chex
import jax
import numpy as np
import pytest

from shardlib.training.data import load_token_splits
from shardlib.training.train_state import learning_rate_schedule
from shardlib.training.trainer import setup_training
from tests.support import assert_trees_close, mesh_of, tiny_config

STEPS = 3
TOLERANCE = 1e-5  # losses: absolute, on values of about 5
REL = 1e-5  # gradients and parameters: relative to each leaf's largest magnitude

CASES = {
    # preset, mesh sizes, extra config
    "dp": ("dp", {"data": 8}, {}),
    "fsdp": ("fsdp", {"data": 8}, {}),
    "tp": ("tp", {"data": 4, "model": 2}, {}),
    "fsdp_tp": ("fsdp_tp", {"data": 4, "model": 2}, {}),
    # HSDP: FSDP over data inside each of 2 data_replica groups, TP over model.
    "hsdp_tp": ("hsdp_tp", {"data_replica": 2, "data": 2, "model": 2}, {}),
    # Gradient accumulation must not change the result either.
    "fsdp_tp_accum": ("fsdp_tp", {"data": 4, "model": 2}, {"grad_accum": 2}),
}


def config(**overrides):
    """The tiny config without warmup (step 1 updates at the peak learning rate), eps 1e-3 (see above)."""
    return tiny_config(optimizer={"warmup_steps": 0, "eps": 1e-3}, **overrides)


def _traced_once(make_train_step):
    """``make_train_step`` whose gradient function may be traced once: the step compiles once for all STEPS."""

    def make(grads_fn, *args, **kwargs):
        make.calls += 1
        return make_train_step(chex.assert_max_traces(grads_fn, n=1), *args, **kwargs)

    make.calls = 0
    return make


def run_steps(cfg, mesh):
    """Losses of STEPS training steps, then (loss, grads) at the final parameters, and the
    initial and final parameters, on the host."""
    chex.clear_trace_counter()
    builder = importlib.import_module(setup_training.__module__)  # where setup_training finds make_train_step
    counted = _traced_once(builder.make_train_step)
    with mock.patch.object(builder, "make_train_step", counted):
        run = setup_training(cfg, mesh)
    assert counted.calls == 1, "setup_training no longer builds its step with make_train_step: nothing counts traces"
    train_tokens, _ = load_token_splits(cfg.data)
    loader = run.loader(train_tokens, seed=cfg.seed)
    params, opt_state = run.init_state()
    initial = jax.device_get(params)
    losses = []
    for _ in range(STEPS):
        params, opt_state, metrics = run.train_step(params, opt_state, loader.next())
        losses.append(float(metrics["loss"]))
    loss, grads = run.grads(params, loader.next())
    return np.array(losses), float(loss), jax.device_get(grads), jax.device_get(params), initial


@functools.cache
def reference():
    return run_steps(config(), mesh_of(devices=1))


@pytest.mark.parametrize("case", list(CASES))
def test_preset_matches_single_device(case):
    preset, sizes, extra = CASES[case]
    ref_losses, ref_loss, ref_grads, ref_params, _ = reference()
    cfg = config(sharding=preset, **extra)
    mesh = mesh_of(**sizes)
    losses, loss, grads, params, _ = run_steps(cfg, mesh)

    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOLERANCE)
    assert abs(loss - ref_loss) <= TOLERANCE
    assert ref_losses[-1] < ref_losses[0], "the reference did not train"
    assert_trees_close(grads, ref_grads, rel=REL, what="gradient")
    assert_trees_close(params, ref_params, rel=REL, what="parameter")


def test_the_compared_steps_update_the_parameters():
    """Guards the test above against comparing parameters that no step changed (a zero learning rate)."""
    cfg = config()
    schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
    assert all(float(schedule(i)) > 0.5 * cfg.optimizer.lr for i in range(STEPS))
    _, _, _, params, initial = reference()
    for (path, p), p0 in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(initial), strict=True):
        moved = float(np.max(np.abs(p - p0)))
        # Each step moves elements by up to about lr: far beyond what REL lets differ.
        assert moved > 100 * REL * float(np.max(np.abs(p))), f"{jax.tree_util.keystr(path)} moved only {moved:.3g}"


def test_the_comparison_catches_a_one_percent_error_in_one_leaf():
    """The helper holds every leaf to its own scale: 1% off in the gradient of one query weight alone
    fails, though its magnitude is so small that the former whole-tree ``atol=1e-5`` let it through."""
    _, _, ref_grads, _, _ = reference()
    assert_trees_close(jax.tree.map(np.copy, ref_grads), ref_grads, rel=REL)  # unperturbed: passes

    perturbed = jax.tree.map(np.copy, ref_grads)
    qkv = perturbed["layers"]["qkv"]  # [L, D, N, G + 2, K]: the query slots are 0..G-1
    scale = float(np.max(np.abs(qkv)))
    q = qkv[:, :, :, :-2]  # a view: the query slots
    q[np.unravel_index(int(np.argmax(np.abs(q))), q.shape)] *= 1.01  # a 1% error in one element of one leaf
    assert np.allclose(qkv, ref_grads["layers"]["qkv"], rtol=0, atol=1e-5), "the old check would have caught it"
    with pytest.raises(AssertionError, match=r"gradient \['layers'\]\['qkv'\]: max\|error\| ") as failure:
        assert_trees_close(perturbed, ref_grads, rel=REL, what="gradient")
    assert "1 of " in str(failure.value) and f"scale max|expected| {scale:.3g}" in str(failure.value)


def test_a_step_that_retraces_is_caught():
    """``chex.assert_max_traces`` in run_steps is live: a second trace of the gradient function fails."""
    chex.clear_trace_counter()
    traced = chex.assert_max_traces(lambda x: x * 2, n=1)
    jax.jit(traced)(np.ones(2, np.float32))
    with pytest.raises(AssertionError, match="traced > 1 times"):
        jax.jit(traced)(np.ones(3, np.float32))  # a new shape: retraced
    chex.clear_trace_counter()


def test_sharded_state_is_actually_sharded():
    """Guards the test above against comparing two replicated runs."""
    run = setup_training(config(sharding="fsdp_tp"), mesh_of(data=4, model=2))
    params, opt_state = run.init_state()
    qkv = params["layers"]["qkv"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None, None)
    assert qkv.addressable_shards[0].data.shape == (2, 8, 1, 4, 8)  # one kv head: its 2 queries, k and v
    mu = opt_state[1][0].mu["layers"]["qkv"]
    assert mu.sharding.spec == qkv.sharding.spec
