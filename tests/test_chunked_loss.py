"""``model.loss_chunk``: the cross-entropy in chunks of the sequence equals the plain one (fp32).

The chunked loss (``shardlib.models.layers.chunked_cross_entropy``) never forms the
whole [B, L, V] logits; its value must match ``cross_entropy`` of the whole
logits to 1e-6 and its gradients to 1e-5 of each leaf's scale, through the
trainer's own gradient and eval steps on the same mesh: one device, data x
model, data x seq, and at the end of a pipeline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardlib.core.rules import preset_rules
from shardlib.core.sharding import ActivationSharding
from shardlib.models.layers import chunked_cross_entropy, cross_entropy
from shardlib.training.config import ConfigError
from shardlib.training.step import make_loss_fn
from shardlib.training.trainer import setup_training
from tests.support import assert_trees_close, first_batch, mesh_of, tiny_config

LOSS_TOL = 1e-6  # absolute, on a loss of about 5.5
REL = 1e-5  # gradients: relative to each leaf's largest magnitude

CASES = {
    # preset, mesh sizes, model overrides (loss_chunk among them), other config
    # Vocabulary split over `model`; tied embeddings: the other output projection.
    "data4-model2-tied": ("tp", {"data": 4, "model": 2}, {"loss_chunk": 4, "tie_embeddings": True}, {}),
    # The sequence split over `seq`: every chunk's 8 tokens split over it too.
    "data4-seq2": ("dp", {"data": 4, "seq": 2}, {"loss_chunk": 8}, {}),
    # The pipeline's last stage takes the chunked loss too.
    "pipe2-data2": ("dp", {"pipe": 2, "data": 2}, {"loss_chunk": 4}, {"pipeline": {"schedule": "1f1b"}}),
}


def loss_grads_eval(cfg, mesh):
    """(gradient step's loss, its gradients, eval step's loss) at the initial parameters, on the host."""
    run, batch, params = first_batch(cfg, mesh)
    loss, grads = run.grads(params, batch)
    return float(loss), jax.device_get(grads), float(run.eval_step(params, batch))


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_matches_the_plain_loss(case):
    """Against the plain loss on the same mesh: sharding alone reorders float32 sums (tests/test_equivalence.py)."""
    preset, sizes, model, extra = CASES[case]
    cfg = tiny_config(sharding=preset, model=model, **extra)
    assert cfg.model.loss_chunk and cfg.seq_len // cfg.model.loss_chunk > 1  # several chunks
    mesh = mesh_of(**sizes) if sizes else mesh_of(devices=1)
    loss, grads, eval_loss = loss_grads_eval(cfg, mesh)
    ref_loss, ref_grads, ref_eval = loss_grads_eval(
        tiny_config(sharding=preset, model={**model, "loss_chunk": 0}, **extra), mesh
    )

    assert abs(loss - ref_loss) <= LOSS_TOL, (loss, ref_loss)
    assert abs(eval_loss - ref_eval) <= LOSS_TOL, (eval_loss, ref_eval)  # eval takes the same loss
    assert_trees_close(grads, ref_grads, rel=REL, what="gradient")


def _shapes(jaxpr):
    """Every variable's shape in ``jaxpr`` and the jaxprs nested in it (scan, checkpoint, pjit bodies)."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_the_whole_logits_are_never_formed():
    """Forward and backward hold [B, C, V] logits at most, never [B, L, V]; the plain loss does form them."""

    def shapes(chunk):
        cfg = tiny_config(model={"loss_chunk": chunk})
        run = setup_training(cfg, mesh_of(devices=1))
        params = jax.eval_shape(lambda: run.init_state()[0])
        tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
        loss_fn = make_loss_fn(run.model.graphdef, run.plan)
        return set(_shapes(jax.make_jaxpr(jax.value_and_grad(loss_fn))(params, tokens, tokens).jaxpr))

    found = {chunk: shapes(chunk) for chunk in (0, 4)}
    whole = (16, 16, 256)  # batch, seq_len, vocab of the tiny config
    assert whole in found[0]
    assert whole not in found[4]
    assert (16, 4, 256) in found[4]


def test_a_chunk_that_does_not_divide_seq_len_is_refused_by_name():
    with pytest.raises(ConfigError) as err:
        tiny_config(model={"loss_chunk": 5})
    reason = str(err.value).splitlines()[1:]
    assert len(reason) == 1 and "model.loss_chunk (5) must divide seq_len (16)" in reason[0], str(err.value)
    assert tiny_config().model.loss_chunk == 0  # off unless set
    assert tiny_config(model={"loss_chunk": 16}).model.loss_chunk == 16


def test_a_chunk_that_does_not_divide_over_seq_is_refused_by_name():
    """Chunks of 1 token cannot be split over seq=2: an error naming the setting, at trace time."""
    mesh = mesh_of(data=4, seq=2)
    shard = ActivationSharding(preset_rules("dp"), mesh)
    x = jax.ShapeDtypeStruct((8, 16, 32), jnp.float32)
    targets = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"model\.loss_chunk=1 does not fit the mesh"):
        jax.eval_shape(lambda x, t: chunked_cross_entropy(x, t, lambda c: c, 1, shard=shard), x, targets)
    with pytest.raises(ValueError, match=r"model\.loss_chunk=3 must divide the sequence length 16"):
        jax.eval_shape(lambda x, t: chunked_cross_entropy(x, t, lambda c: c, 3), x, targets)


def test_chunked_cross_entropy_by_hand():
    """The function alone: a chunk of the logits is a projection of the chunk; value and input gradients."""
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 12, 8))
    w = jax.random.normal(kw, (8, 40))
    targets = jax.random.randint(kt, (2, 12), 0, 40)

    def plain_loss(x, w):
        logprobs = jax.nn.log_softmax(x @ w, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logprobs, targets[..., None], axis=-1))

    ref_value, ref_grads = jax.jit(jax.value_and_grad(plain_loss, (0, 1)))(x, w)

    def chunked_loss(x, w, chunk):
        return chunked_cross_entropy(x, targets, lambda c: c @ w, chunk)

    for chunk in (1, 3, 12):
        value, grads = jax.jit(jax.value_and_grad(chunked_loss, (0, 1)), static_argnums=2)(x, w, chunk)
        assert abs(float(value) - float(ref_value)) <= LOSS_TOL, chunk
        assert_trees_close(grads, ref_grads, rel=REL, what=f"gradient (chunk {chunk})")
        np.testing.assert_array_less(0.0, float(value))


def test_targets_out_of_the_vocabulary_behave_as_in_the_plain_loss():
    """take_along_axis semantics: -1 is the last id, an id past the vocabulary makes the loss NaN."""
    logits = jnp.arange(2 * 4 * 5, dtype=jnp.float32).reshape(2, 4, 5) / 7
    for bad in (-1, 5):
        targets = jnp.array([[0, 1, 2, 3], [4, bad, 0, 1]])
        got = float(chunked_cross_entropy(logits, targets, lambda c: c, 2))
        np.testing.assert_allclose(got, float(cross_entropy(logits, targets)), rtol=1e-6)
