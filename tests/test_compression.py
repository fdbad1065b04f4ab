"""Compressed gradient all-reduce (shardlib.parallel.compression): error bounds, error feedback, wire bytes, training.

Bounds used below (N shards, float32 inputs g_i, exact mean g = mean_i g_i):

* bf16 rounds twice (each shard's vector, then the averaged block), each time
  to within the unit roundoff 2^-8 of the value, so
  |out - g| <= 2^-8 (mean_i |g_i| + |g|), up to float32 rounding.
* int8 rounds to within half a step, step = max|.|/127 over the value's group
  of 256, twice: |out - g| <= mean_i A_i/254 + A/254, with A_i the group
  max of shard i and A that of the averaged block.
* Error feedback: with constant inputs, sum_t out_t = T g - mean_i e_i - s
  exactly (e_i, s the residuals after T steps), so the accumulated error stays
  one step's worth instead of growing like T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.analysis import hlo
from shardlib.parallel.compression import INT8_GROUP, compressed_mean, payload_bytes
from shardlib.training.checkpoint import Checkpointer
from shardlib.training.data import load_token_splits
from shardlib.training.train_state import abstract_state, learning_rate_schedule
from shardlib.training.trainer import setup_training
from tests.support import mesh_of, tiny_config

N = 4  # the "data" ring of a data=4 x model=2 mesh; "model" runs 2 independent rings
SIZE = N * INT8_GROUP * 2  # per-device vector: 8 int8 groups, 2 per block
ROWS = 8  # one row per device, data-major: device (d, m) is row 2d + m


def _gradients(seed: int = 0) -> np.ndarray:
    """[devices, SIZE] float32 with group scales spread over 4 decades, like real gradients."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-5, 4, size=(ROWS, SIZE // INT8_GROUP, 1)))
    return (rng.normal(size=(ROWS, SIZE // INT8_GROUP, INT8_GROUP)) * scales).reshape(ROWS, SIZE).astype(np.float32)


@functools.cache
def _mean_fn(mode: str):
    """Jitted per-device compressed_mean over "data", and its compiled HLO text."""
    mesh = mesh_of(data=N, model=2)
    per_device = PartitionSpec(("data", "pipe", "expert", "seq", "model"))

    def body(u, worker, server):
        mean, worker, server = compressed_mean(u[0], worker[0], server[0], "data", mode)
        return mean[None], worker[None], server[None]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(per_device,) * 3, out_specs=(per_device,) * 3))
    zeros = (np.zeros((ROWS, SIZE), np.float32), np.zeros((ROWS, SIZE // N), np.float32))
    compiled = fn.lower(_gradients(), *zeros).compile()
    return compiled, compiled.as_text()


def _rings(x: np.ndarray) -> list[np.ndarray]:
    """The rows of each "data" ring (same model index): [N, ...] per ring."""
    return [x[m::2] for m in range(2)]


def _bound(mode: str, g_NxS: np.ndarray, exact_S: np.ndarray) -> np.ndarray:
    """Per-element bound on |compressed mean - exact mean| for one call with zero residuals."""
    if mode == "bfloat16":
        return 2.0**-8 * (np.abs(g_NxS).mean(0) + np.abs(exact_S)) * (1 + 1e-5)
    groups = lambda v: np.abs(v.reshape(v.shape[:-1] + (-1, INT8_GROUP))).max(-1)
    worker = (groups(g_NxS) / 254).mean(0)  # [S/256]: each shard's rounding, averaged
    # The averaged block differs from the exact mean by at most `worker`, which bounds its group max.
    server = (groups(exact_S) + worker) / 254
    return np.repeat(worker + server, INT8_GROUP) * (1 + 1e-5)


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8"])
def test_compressed_mean_error_is_bounded_and_identical_on_every_device(mode):
    compiled, text = _mean_fn(mode)
    g = _gradients()
    mean, worker, server = jax.device_get(compiled(g, np.zeros((ROWS, SIZE), np.float32), np.zeros((ROWS, SIZE // N))))
    worst = 0.0
    for g_ring, out_ring in zip(_rings(g), _rings(mean), strict=True):
        exact = g_ring.astype(np.float64).mean(0)
        for row in out_ring[1:]:
            np.testing.assert_array_equal(row, out_ring[0], err_msg="replicas must agree bitwise")
        err = np.abs(out_ring[0] - exact)
        if mode == "float32":
            np.testing.assert_allclose(out_ring[0], exact, rtol=1e-6, atol=1e-6 * np.abs(g_ring).max())
            continue
        bound = _bound(mode, g_ring, exact)
        assert np.all(err <= bound), f"{mode}: error exceeds the rounding bound by {np.max(err / bound):.3f}x"
        worst = max(worst, float(np.max(err / bound)))
    assert not np.array_equal(_rings(mean)[0][0], _rings(mean)[1][0]), "the two model rings must stay independent"
    if mode == "float32":
        assert not np.any(worker) and not np.any(server), "lossless: no residual"
    else:
        assert worst > 0.25, f"{mode}: errors far below the rounding bound ({worst:.3f}): was anything rounded?"
        # Residuals are exactly what was lost: u - deQ(Q(u)) per shard.
        assert np.any(worker) and np.any(server)

    # Bytes on the wire: (N-1) blocks out in the all-to-all, (N-1) in the all-gather, all compressed.
    sent = hlo.summarize(hlo.collectives(text))
    assert set(sent) == {"collective-permute"}
    assert sent["collective-permute"]["bytes"] == 2 * (N - 1) / N * payload_bytes(SIZE, mode)


@pytest.mark.parametrize("mode", ["bfloat16", "int8"])
def test_error_feedback_keeps_the_accumulated_error_bounded(mode):
    compiled, _ = _mean_fn(mode)
    g = _gradients(seed=1)
    steps = 16
    exact = np.stack([ring.astype(np.float64).mean(0) for ring in _rings(g)])  # [2, S]
    worker, server = np.zeros((ROWS, SIZE), np.float32), np.zeros((ROWS, SIZE // N), np.float32)
    total = np.zeros((2, SIZE))
    no_feedback = np.zeros((2, SIZE))
    for _ in range(steps):
        mean, worker, server = jax.device_get(compiled(g, worker, server))
        total += np.stack([ring[0] for ring in _rings(mean)])
        fresh, _, _ = jax.device_get(compiled(g, np.zeros_like(worker), np.zeros_like(server)))
        no_feedback += np.stack([ring[0] for ring in _rings(fresh)])
    one_step = np.stack([_bound(mode, ring, e) for ring, e in zip(_rings(g), exact, strict=True)])
    # The identity sum_t out_t = T g - mean_i e_i - s, with s gathered from the ring members' blocks.
    for m, (w_ring, s_ring) in enumerate(zip(_rings(worker), _rings(server), strict=True)):
        residual = w_ring.astype(np.float64).mean(0) + s_ring.reshape(-1)
        np.testing.assert_allclose(total[m], steps * exact[m] - residual, rtol=0, atol=1e-5 * steps * np.abs(g).max())
    assert np.all(np.abs(total - steps * exact) <= one_step * 1.001 + 1e-6 * steps * np.abs(g).max())
    # Without feedback the same rounding repeats every step and the error grows like T.
    assert np.max(np.abs(no_feedback - steps * exact) / one_step) > 4, "the test cannot tell feedback from none"


# --------------------------------------------------------------------------- training


TRAIN_STEPS = 10
MESH = {"data": 8}
NOISE = 1e-5  # float32: per-shard losses averaged vs one global mean


def _loss_bound(setting: str, base: np.ndarray, history: dict | None = None) -> np.ndarray:
    """How far a compressed run's loss may be from the uncompressed one at each step.

    bf16 keeps every element to a relative 2^-8, twice, so every update is
    off by at most ~2^-7 relative, and to first order the loss drop since step
    1 by the same fraction: 2^-7 (loss_1 - loss_t).

    int8 has no relative bound (an element below half a quantisation step is
    sent as 0), so the bound is built from the quantisation error itself:

    1. What int8 changed in step s's gradient: error feedback sends
       u = g + R_{s-1} and keeps what rounding lost, R_s = u - sent (per group
       of 256, scale max|u|/127, each value off by at most scale/2; R is the
       ring's mean worker residual plus the server's, see the module docstring),
       so the compressed gradient is exactly g_s + e_s with e_s = R_{s-1} - R_s.
    2. What that does to step s's AdamW update D_i = lr m^/(sqrt(v^) + eps),
       per element, from the same state. With a = (1-b1)/(1-b1^s) and
       b = (1-b2)/(1-b2^s) the bias-corrected weights of the newest gradient:
       |D_i| <= lr c with c^2 = (a^2/b) sum_k<s (b1^2/b2)^k (Cauchy-Schwarz over
       the moment averages), so an update changes by at most 2 lr c, whatever
       e_i is; and |g_i| |dD_i/dg_i| <= lr (a/sqrt(b) + c) = lr K, because
       v^ >= b g_i^2. Hence, to first order in e,
       |g_i| |D_i(g + e) - D_i(g)| <= lr min(2 c |g_i|, K |e_i|):
       a small gradient may flip its update, but it is worth little loss; a
       large one barely moves. Clipping scales g and e alike and drops out.
    3. To first order the loss a step's update buys is sum_i g_i D_i, so what
       int8 costs by step t is at most
           sum_{s<t} lr_s sum_i min(2 c_s |g_s,i|, K_s |e_s,i|),
       with g_s the uncompressed gradients and e_s the measured rounding
       (both in ``history``). No credit is taken for error feedback paying the
       rounding back later: through Adam's normalisation that is not exact.
    """
    if setting == "bf16":
        return 2.0**-7 * np.maximum(base[0] - base, 0) + NOISE
    b1, b2 = history["betas"]
    cost = [0.0]  # before step 1's update
    for s, (lr, g, e) in enumerate(zip(history["lr"], history["grads"], history["errors"], strict=True), start=1):
        a, b = (1 - b1) / (1 - b1**s), (1 - b2) / (1 - b2**s)
        c = np.sqrt(a * a / b * sum((b1 * b1 / b2) ** k for k in range(s)))
        k = a / np.sqrt(b) + c
        cost.append(cost[-1] + lr * float(np.minimum(2 * c * np.abs(g), k * np.abs(e)).sum()))
    return np.array(cost[: len(base)]) + NOISE


@functools.cache
def _training():
    """Per setting: (losses of TRAIN_STEPS steps, compiled step's collectives, final opt_state).

    Every run starts from the same state (created once) and sees the same batches.
    ``results["history"]``: what _loss_bound needs for int8, per step: the
    uncompressed run's gradients (flat, in the compressed vector's leaf order),
    the int8 run's rounding errors e_s = R_{s-1} - R_s, learning rates, betas.
    """
    results = {}
    history = {"grads": [], "errors": [], "lr": []}
    mesh = mesh_of(**MESH)
    initial = None
    for setting in ("none", "fp32", "bf16", "int8"):
        # fp32 (the compressed path, uncompressed) is not a config choice; model_copy skips validation.
        cfg = tiny_config(sharding="dp").model_copy(update={"grad_compression": setting})
        run = setup_training(cfg, mesh)
        if initial is None:
            initial = run.init_state()
        params, opt_state = jax.tree.map(jnp.copy, initial)  # the step donates its inputs
        if setting != "none":
            shapes = jax.eval_shape(run.tx.init, run.model.params)["error_feedback"]
            shardings = run.shardings.opt_state["error_feedback"]
            zeros = {k: jax.device_put(np.zeros(v.shape, v.dtype), shardings[k]) for k, v in shapes.items()}
            opt_state = {"tx": opt_state, "error_feedback": zeros}
        tokens, _ = load_token_splits(cfg.data)
        loader = run.loader(tokens, seed=cfg.seed)
        batch = loader.next()
        compiled = run.train_step.lower(params, opt_state, batch).compile()
        losses = []
        residual = 0.0
        for step in range(TRAIN_STEPS):
            if setting == "none":
                flat = [np.ravel(g) for g in jax.tree.leaves(jax.device_get(run.grads(params, batch)[1]))]
                history["grads"].append(np.concatenate(flat).astype(np.float64))
                history["lr"].append(float(learning_rate_schedule(cfg.optimizer, cfg.steps)(step)))
            params, opt_state, metrics = run.train_step(params, opt_state, batch)
            losses.append(float(metrics["loss"]))
            batch = loader.next()
            if setting == "int8":  # dp: one ring of all devices; R = mean worker residual + the server blocks
                feedback = jax.device_get(opt_state["error_feedback"])
                now = feedback["worker"].astype(np.float64).mean(0) + feedback["server"].reshape(-1)
                history["errors"].append((residual - now)[: history["grads"][0].size])  # drop the padding
                residual = now
        if setting == "int8":  # then a batch whose out-of-vocabulary tokens make the gradients NaN
            kept = jax.device_get(opt_state["error_feedback"])
            poisoned = {
                k: jax.device_put(np.full(v.shape, cfg.model.vocab_size, v.dtype), v.sharding) for k, v in batch.items()
            }
            _, after, metrics = run.train_step(params, jax.tree.map(jnp.copy, opt_state), poisoned)
            nan_step = (
                float(metrics["loss"]),
                float(metrics["grad_norm"]),
                kept,
                jax.device_get(after["error_feedback"]),
            )
        results[setting] = (np.array(losses), hlo.collectives(compiled.as_text()), opt_state)
    results["nan_step"] = nan_step
    history["betas"] = (cfg.optimizer.b1, cfg.optimizer.b2)
    results["history"] = history
    return results


def test_compressed_training_tracks_uncompressed_and_sends_less():
    runs = _training()
    base = runs["none"][0]
    assert base[-1] < base[0] - 1.0, "the uncompressed run did not train"
    # The same explicit path without compression is the uncompressed step (as in test_equivalence).
    np.testing.assert_allclose(runs["fp32"][0], base, rtol=0, atol=1e-5)
    for setting in ("bf16", "int8"):
        losses = runs[setting][0]
        assert abs(losses[0] - base[0]) <= NOISE, "step 1 sees the same parameters"
        bound = _loss_bound(setting, base, runs["history"])
        assert np.all(np.abs(losses - base) <= bound), (
            f"{setting}: |loss - uncompressed| = {np.round(np.abs(losses - base), 6)} exceeds {np.round(bound, 6)}"
        )
        assert not np.array_equal(losses, base), f"{setting}: identical losses; was anything compressed?"
        feedback = runs[setting][2]["error_feedback"]
        assert float(jnp.max(jnp.abs(feedback["worker"]))) > 0, "residuals are kept"

    # A non-finite step reports non-finite gradients (int8 alone would round NaN to a number) and
    # leaves the residuals alone, so nan_policy=skip drops it cleanly.
    nan_loss, nan_norm, kept, after = runs["nan_step"]
    assert not np.isfinite(nan_loss) and not np.isfinite(nan_norm)
    for key in kept:
        np.testing.assert_array_equal(after[key], kept[key], err_msg=f"{key} residuals changed by a NaN step")

    # Bytes on the wire, from the compiled steps.
    n = MESH["data"]
    num_params = tiny_config().model.num_params()
    optimal_fp32 = 2 * (n - 1) / n * 4 * num_params
    xla = [c for c in runs["none"][1] if c.kind == "all-reduce" and c.group_size == n]
    assert abs(sum(c.wire_bytes * c.executions for c in xla) - optimal_fp32) <= 2 * (n - 1) / n * 4  # + the loss
    sent = {}
    for setting in ("fp32", "bf16", "int8"):
        found = runs[setting][1]
        leftover = [c for c in found if c.kind != "collective-permute"]
        assert sum(c.total_bytes for c in leftover) <= 8, f"{setting}: only scalars besides the rings: {leftover}"
        sent[setting] = sum(c.total_bytes for c in found if c.kind == "collective-permute")
    # The fp32 ring moves what XLA's all-reduce does (the vector pads to a multiple of N: none here).
    assert num_params % n == 0 and sent["fp32"] == optimal_fp32
    assert sent["bf16"] == sent["fp32"] / 2
    group_padded = -(-num_params // (n * INT8_GROUP)) * n * INT8_GROUP
    assert sent["int8"] == 2 * (n - 1) / n * payload_bytes(group_padded, "int8")
    assert sent["int8"] / sent["fp32"] < 0.25 * (1 + 1 / 64) * group_padded / num_params + 1e-9


def test_error_feedback_is_checkpointed_per_device(tmp_path):
    cfg = tiny_config(sharding="tp", grad_compression="int8")
    mesh = mesh_of(data=4, model=2)
    run = setup_training(cfg, mesh)
    target = abstract_state(run.model, run.tx, run.shardings)  # what a resumed run restores onto
    params, opt_state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), target)
    feedback = opt_state["error_feedback"]
    assert feedback["worker"].shape[0] == mesh.size and feedback["server"].shape[0] == mesh.size
    assert feedback["worker"].sharding.spec == PartitionSpec(tuple(mesh.axis_names))
    rng = np.random.default_rng(0)
    values = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in feedback.items()}
    opt_state = {**opt_state, "error_feedback": {k: jax.device_put(values[k], v.sharding) for k, v in feedback.items()}}
    checkpointer = Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    checkpointer.save(1, params, opt_state, {"data_position": 0})
    checkpointer.wait()
    _, restored, _ = checkpointer.restore(1, *target)
    checkpointer.close()
    for key, value in values.items():
        got = restored["error_feedback"][key]
        np.testing.assert_array_equal(np.asarray(got), value)
        assert got.sharding.spec == PartitionSpec(tuple(mesh.axis_names))
        assert got.addressable_shards[3].data.shape == (1, value.shape[1])


def test_compression_refuses_fsdp():
    with pytest.raises(
        ValueError,
        match="sharding=fsdp does not combine with grad_compression=bf16: compressed gradients need parameters replicated",
    ):
        setup_training(tiny_config(sharding="fsdp", grad_compression="bf16"), mesh_of(data=8))


def test_residual_rows_follow_the_mesh():
    """Row d of the residuals lives on device d of the mesh (the per-device layout's premise)."""
    mesh = mesh_of(data=4, model=2)
    index = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names))).devices_indices_map((mesh.size, 1))
    assert [index[d][0].start for d in mesh.devices.flat] == list(range(mesh.size))


def test_int8_keeps_replicated_parameters_bitwise_identical_across_tensor_peers():
    """An int8 group that mixed a replicated leaf with a tensor-parallel one gave the replicated
    leaf another scale on each model peer, and its replicas drifted apart (found by the
    checkpoint checksums: a restore onto another mesh read one replica, the digest another)."""
    cfg = tiny_config(sharding="tp", grad_compression="int8")
    run = setup_training(cfg, mesh_of(data=4, model=2))
    loader = run.loader(load_token_splits(cfg.data)[0], seed=cfg.seed)
    params, opt_state = run.init_state()
    for _ in range(2):
        params, opt_state, _ = run.train_step(params, opt_state, loader.next())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        copies: dict = {}
        for shard in leaf.addressable_shards:
            copies.setdefault(str(shard.index), []).append(np.asarray(shard.data))
        for index, replicas in copies.items():
            for replica in replicas[1:]:
                np.testing.assert_array_equal(replica, replicas[0], err_msg=f"{jax.tree_util.keystr(path)} {index}")
