"""Tests for shardlib/models/: shapes, sharding metadata, and numerics against naive references.

Shapes are tiny because compilation dominates on CPU; configs are shared so a
jitted forward compiles once per config.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardlib.models import Transformer, create_model, no_shard, remat
from shardlib.models.layers import apply_rope, causal_gqa_attention, normal_init
from shardlib.models.remat import rematerialize
from shardlib.training.config import ModelConfig

BATCH, LENGTH = 2, 16

# The golden table of parameter paths, shapes (for tiny_cfg()) and logical axes.
GOLDEN_PARAMS = {
    "embed/embedding": ((64, 32), ("vocab", "embed")),
    "layers/attn_norm": ((2, 32), ("layers", "embed")),
    "layers/qkv": ((2, 32, 2, 4, 8), ("layers", "embed", "kv_heads", None, "head_dim")),  # 2 queries, k, v
    "layers/o": ((2, 4, 8, 32), ("layers", "heads", "head_dim", "embed")),
    "layers/mlp_norm": ((2, 32), ("layers", "embed")),
    "layers/gate_up": ((2, 32, 2, 64), ("layers", "embed", None, "mlp")),
    "layers/down": ((2, 64, 32), ("layers", "mlp", "embed")),
    "final_norm": ((32,), ("embed",)),
    "unembed": ((32, 64), ("embed", "vocab")),
}
MESH_AXIS_NAMES = {"data", "fsdp", "model", "tensor", "pipe", "stage", "expert", "seq", "context"}


def tiny_cfg(**overrides) -> ModelConfig:
    # n_kv_heads < n_heads so every test exercises grouped-query attention.
    base = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
    return ModelConfig(**(base | overrides))


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    # Eager on purpose: each op compiles once per shape and is cached across
    # tests, whereas a jitted init recompiles the whole RNG graph per config.
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def flat_params(model: nnx.Module) -> dict[str, nnx.Param]:
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens_BxL, positions_BxL=None):
    return nnx.merge(graphdef, state)(tokens_BxL, positions_BxL=positions_BxL)


def logits_of(model, tokens_BxL, positions_BxL=None) -> np.ndarray:
    return np.asarray(forward(*nnx.split(model), tokens_BxL, positions_BxL))


@pytest.fixture(scope="module")
def tokens_BxL():
    return jnp.asarray(np.random.default_rng(1).integers(0, 64, (BATCH, LENGTH)), jnp.int32)


# ---------------------------------------------------------------- naive reference (numpy)


def _rms_ref(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope_ref(x_BxLxHxK, positions_BxL, theta):
    # Channel i and i + K/2 form one complex number rotated by pos * theta^(-2i/K).
    half = x_BxLxHxK.shape[-1] // 2
    z = x_BxLxHxK[..., :half] + 1j * x_BxLxHxK[..., half:]
    angle = positions_BxL[:, :, None, None] * theta ** (-2.0 * np.arange(half) / (2 * half))
    z = z * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def _attention_ref(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK):
    """Causal attention with k/v repeated to every query head, one head at a time."""
    n_heads, head_dim = q_BxLxHxK.shape[2:]
    group = n_heads // k_BxLxNxK.shape[2]
    k_BxLxHxK = np.repeat(k_BxLxNxK, group, axis=2)
    v_BxLxHxK = np.repeat(v_BxLxNxK, group, axis=2)
    length = q_BxLxHxK.shape[1]
    causal_LxL = np.tril(np.ones((length, length), bool))
    out = np.zeros_like(q_BxLxHxK)
    for h in range(n_heads):
        scores = q_BxLxHxK[:, :, h] @ k_BxLxHxK[:, :, h].transpose(0, 2, 1) / np.sqrt(head_dim)
        scores = np.where(causal_LxL, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, h] = probs @ v_BxLxHxK[:, :, h]
    return out


def _reference_logits(params, tokens_BxL, cfg):
    p = {name: np.asarray(var[...], np.float64) for name, var in params.items()}
    positions_BxL = np.broadcast_to(np.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x = p["embed/embedding"][np.asarray(tokens_BxL)]
    for i in range(cfg.n_layers):
        w = {name.removeprefix("layers/"): a[i] for name, a in p.items() if name.startswith("layers/")}
        h = _rms_ref(x, w["attn_norm"], cfg.norm_eps)
        # The fused layout, read head by head: query head h is slot h % G of kv head h // G.
        qkv, group = w["qkv"], cfg.n_heads // cfg.n_kv_heads
        w_q = np.stack([qkv[:, head // group, head % group] for head in range(cfg.n_heads)], axis=1)
        q = _rope_ref(np.einsum("bld,dhk->blhk", h, w_q), positions_BxL, cfg.rope_theta)
        k = _rope_ref(np.einsum("bld,dhk->blhk", h, qkv[:, :, group]), positions_BxL, cfg.rope_theta)
        v = np.einsum("bld,dhk->blhk", h, qkv[:, :, group + 1])
        x = x + np.einsum("blhk,hkd->bld", _attention_ref(q, k, v), w["o"])
        h = _rms_ref(x, w["mlp_norm"], cfg.norm_eps)
        gate, up = h @ w["gate_up"][:, 0], h @ w["gate_up"][:, 1]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["down"]
    x = _rms_ref(x, p["final_norm"], cfg.norm_eps)
    unembed = p["embed/embedding"].T if cfg.tie_embeddings else p["unembed"]
    return x @ unembed


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_shape_dtype_and_param_count(tie, tokens_BxL):
    cfg = tiny_cfg(tie_embeddings=tie)
    model = build(cfg)
    n_params = sum(var[...].size for var in flat_params(model).values())
    assert n_params == cfg.num_params()
    assert ("unembed" in flat_params(model)) != tie
    logits = forward(*nnx.split(model), tokens_BxL)
    assert logits.shape == (BATCH, LENGTH, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_param_paths_shapes_and_logical_axes():
    params = flat_params(build(tiny_cfg()))
    got = {name: (var[...].shape, var.get_metadata()["out_sharding"]) for name, var in params.items()}
    assert got == GOLDEN_PARAMS
    for name, (shape, names) in got.items():
        assert len(names) == len(shape), name
        assert not MESH_AXIS_NAMES & set(names), f"{name} names a mesh axis: {names}"


def test_matches_naive_reference(tokens_BxL):
    cfg = tiny_cfg(init_std=0.2)  # larger weights so attention is far from uniform
    model = build(cfg)
    expected = _reference_logits(flat_params(model), tokens_BxL, cfg)
    np.testing.assert_allclose(logits_of(model, tokens_BxL), expected, rtol=1e-5, atol=1e-5)


def test_gqa_attention_matches_repeated_kv_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((BATCH, LENGTH, heads, 8)) for heads in (6, 2, 2))
    positions = np.broadcast_to(np.arange(LENGTH), (BATCH, LENGTH))
    got = jax.jit(causal_gqa_attention)(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), positions, positions)
    expected = _attention_ref(q, k, v)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_causality(tokens_BxL):
    model = build(tiny_cfg(tie_embeddings=True))
    t = 7
    changed = tokens_BxL.at[:, t].set((tokens_BxL[:, t] + 1) % 64)
    before, after = logits_of(model, tokens_BxL), logits_of(model, changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert np.all(np.abs(before[:, t:] - after[:, t:]).max(axis=-1) > 0)


def test_rope_scores_depend_only_on_relative_position():
    q, k = np.random.default_rng(0).standard_normal((2, 1, 1, 1, 8)).astype(np.float32)

    @jax.jit
    def rope_score(q_pos, k_pos):
        rq = apply_rope(q, jnp.full((1, 1), q_pos), 10000.0)
        rk = apply_rope(k, jnp.full((1, 1), k_pos), 10000.0)
        return jnp.sum(rq * rk)

    def score(q_pos, k_pos):
        return float(rope_score(q_pos, k_pos))

    np.testing.assert_allclose([score(3, 1), score(10, 8), score(257, 255)], score(2, 0), rtol=1e-5)
    assert abs(score(5, 0) - score(2, 0)) > 1e-3  # and it does depend on the distance
    rotated = jax.jit(apply_rope, static_argnums=2)(q, jnp.full((1, 1), 123), 10000.0)
    np.testing.assert_allclose(np.linalg.norm(rotated), np.linalg.norm(q), rtol=1e-6)


def test_positions_shift_and_permutation(tokens_BxL):
    model = build(tiny_cfg())
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    base = logits_of(model, tokens_BxL, positions)
    # RoPE and the mask see only position differences.
    np.testing.assert_allclose(logits_of(model, tokens_BxL, positions + 100), base, atol=1e-4)
    # Reordering tokens together with their positions reorders the logits.
    perm = np.random.default_rng(0).permutation(LENGTH)
    permuted = logits_of(model, tokens_BxL[:, perm], positions[:, perm])
    np.testing.assert_allclose(permuted, base[:, perm], atol=1e-5)


def _loss(graphdef, state, tokens_BxL):
    logits = nnx.merge(graphdef, state)(tokens_BxL[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BxL[:, 1:, None], axis=-1))


def _iter_eqns(jaxpr):
    """Every equation of a jaxpr, recursing into scan/remat/pjit bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _iter_eqns(sub)


REMAT_POLICIES = {"none": None, **remat.REMAT_POLICIES}


def test_remat_policies_agree(tokens_BxL):
    results = {}
    for name, policy in REMAT_POLICIES.items():
        graphdef, state = nnx.split(build(tiny_cfg(remat=name)))
        jaxpr = jax.make_jaxpr(_loss, static_argnums=0)(graphdef, state, tokens_BxL).jaxpr
        used = [eqn.params["policy"] for eqn in _iter_eqns(jaxpr) if eqn.primitive.name in ("remat2", "checkpoint")]
        assert used == ([] if policy is None else [policy])
        loss_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
        results[name] = loss_and_grad(graphdef, state, tokens_BxL)
    loss_ref, grads_ref = results["none"]
    for policy in ("full", "save_matmuls", "save_matmuls_attention"):
        loss, grads = results[policy]
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def _stand_in_fused_attention():
    """A custom_vjp shaped like cuDNN's fused attention (which a CPU cannot trace): its forward is one
    primitive named like cuDNN's, whose output the backward reads as a residual."""
    forward_p = jax.extend.core.Primitive(remat.FUSED_ATTENTION_FORWARD + "_stand_in")
    forward_p.def_impl(jnp.sin)
    forward_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))

    @jax.custom_vjp
    def attention(x):
        return forward_p.bind(x)

    def attention_fwd(x):
        y = forward_p.bind(x)
        return y, (x, y)

    # The backward reads the forward's output, as cuDNN's reads its output and statistics.
    attention.defvjp(attention_fwd, lambda res, g: (g * jnp.cos(res[0]) * (1 + 0 * res[1]),))
    return attention, forward_p


@pytest.mark.parametrize("policy, forwards", [("save_matmuls", 2), ("save_matmuls_attention", 1)])
def test_save_matmuls_attention_keeps_the_fused_kernels_outputs(policy, forwards):
    """Under save_matmuls the backward reruns a custom_vjp's forward for its residuals; the policy that
    saves the fused attention primitive's outputs runs it once (and the gradient is the same)."""
    attention, forward_p = _stand_in_fused_attention()
    w = jnp.linspace(0.5, 1.5, 12).reshape(4, 3)

    def layer(x_BxD):
        return jnp.sum(jnp.tanh(attention(x_BxD @ w) @ w.T))

    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    grad = jax.grad(rematerialize(layer, policy))
    jaxpr = jax.make_jaxpr(grad)(x).jaxpr
    assert sum(eqn.primitive is forward_p for eqn in _iter_eqns(jaxpr)) == forwards
    np.testing.assert_allclose(grad(x), jax.grad(layer)(x), rtol=1e-6)


@pytest.mark.parametrize("moe", [False, True])
def test_an_unrolled_layer_scan_computes_what_the_loop_does(tokens_BxL, moe):
    """scan_unroll changes the program's shape, not its function: loss and every gradient as the loop's."""
    extra = {"moe": {"n_experts": 2, "period": 1}} if moe else {}
    results = {}
    for unroll in (1, 2):
        graphdef, state = nnx.split(build(tiny_cfg(scan_unroll=unroll, **extra)))
        jaxpr = jax.make_jaxpr(_loss, static_argnums=0)(graphdef, state, tokens_BxL).jaxpr
        assert {eqn.params["unroll"] for eqn in _iter_eqns(jaxpr) if eqn.primitive.name == "scan"} == {unroll}
        results[unroll] = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(graphdef, state, tokens_BxL)
    (loss_ref, grads_ref), (loss, grads) = results[1], results[2]
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert np.max(np.abs(g - g_ref)) <= 1e-5 * np.max(np.abs(g_ref)) + 1e-12


def test_bf16_close_to_fp32(tokens_BxL):
    logits32 = logits_of(build(tiny_cfg(init_std=0.2)), tokens_BxL)
    model = build(tiny_cfg(init_std=0.2, param_dtype="bfloat16", compute_dtype="bfloat16"))
    assert {var[...].dtype for var in flat_params(model).values()} == {jnp.dtype(jnp.bfloat16)}
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(forward.__wrapped__, static_argnums=0)(graphdef, state, tokens_BxL)
    dot_dtypes = {
        var.aval.dtype for eqn in _iter_eqns(jaxpr.jaxpr) if eqn.primitive.name == "dot_general" for var in eqn.invars
    }
    assert dot_dtypes == {jnp.dtype(jnp.bfloat16)}  # every matmul runs in the compute dtype
    logits16 = forward(graphdef, state, tokens_BxL)
    assert logits16.dtype == jnp.float32
    rel_err = np.linalg.norm(np.asarray(logits16) - logits32) / np.linalg.norm(logits32)
    assert rel_err < 3e-2  # measured 1.2e-2


def test_shard_called_with_logical_names(tokens_BxL):
    model = build(tiny_cfg())
    calls = []

    def recording_shard(x, names):
        calls.append((names, x.shape))
        return x

    jax.eval_shape(lambda m, t: m(t, shard=recording_shard), model, tokens_BxL)
    bl = (BATCH, LENGTH)
    # One trace of the scanned layer body sits between embedding and logits.
    assert calls == [
        (("batch", "length", "embed"), (*bl, 32)),
        (("batch", "length", "kv_heads", None, "head_dim"), (*bl, 2, 4, 8)),
        (("batch", "length", "heads", "head_dim"), (*bl, 4, 8)),
        (("batch", "length", "kv_heads", "head_dim"), (*bl, 2, 8)),
        (("batch", "length", "kv_heads", "head_dim"), (*bl, 2, 8)),
        (("batch", "length", None, "mlp"), (*bl, 2, 64)),
        (("batch", "length", "mlp"), (*bl, 64)),
        (("batch", "length", "embed"), (*bl, 32)),
        (("batch", "length", "vocab"), (*bl, 64)),
    ]


def test_create_model_dispatch():
    cfg = tiny_cfg()
    with nnx.use_eager_sharding(False):
        assert isinstance(create_model(cfg, nnx.Rngs(0)), Transformer)
        with pytest.raises(ValueError, match="known models: transformer"):
            create_model(cfg.model_copy(update={"name": "gpt"}), nnx.Rngs(0))
    assert no_shard(x := jnp.ones(3), ("embed",)) is x


def test_fused_projections_keep_the_initial_distribution():
    """Every q/k/v slot and both gate/up halves draw from N(0, init_std^2): the separate weights' own values."""
    cfg = tiny_cfg(d_model=64, d_ff=128, init_std=0.05)
    params = {name: np.asarray(var[...]) for name, var in flat_params(build(cfg, seed=3)).items()}
    group = cfg.n_heads // cfg.n_kv_heads
    qkv, gate_up = params["layers/qkv"], params["layers/gate_up"]
    parts = {"q": qkv[:, :, :, :group], "k": qkv[:, :, :, group], "v": qkv[:, :, :, group + 1]}
    parts |= {"gate": gate_up[:, :, 0], "up": gate_up[:, :, 1]}
    for name, part in parts.items():
        assert abs(part.mean()) < 0.1 * cfg.init_std, name
        assert part.std() == pytest.approx(cfg.init_std, rel=0.1), name
    again = {name: np.asarray(var[...]) for name, var in flat_params(build(cfg, seed=3)).items()}
    assert all(np.array_equal(params[n], again[n]) for n in params)  # deterministic from the seed
    # The very values the separate weights had: each part drawn with the key it had, in the same order
    # (embedding, q, k, v, o, gate, up, down), so a seed gives the same initial network as before the fusion.
    rngs = nnx.Rngs(params=3)
    rngs.params()  # the embedding's
    l, d, h, n, k, f = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, cfg.d_ff
    drawn = {
        name: np.asarray(normal_init(rngs.params(), (l, *shape), cfg.init_std, jnp.float32))
        for name, shape in [("q", (d, h, k)), ("k", (d, n, k)), ("v", (d, n, k))]
    }
    rngs.params()  # o's
    drawn |= {
        name: np.asarray(normal_init(rngs.params(), (l, d, f), cfg.init_std, jnp.float32)) for name in ("gate", "up")
    }
    np.testing.assert_array_equal(parts["q"].reshape(l, d, h, k), drawn["q"])
    for name in ("k", "v", "gate", "up"):
        np.testing.assert_array_equal(parts[name], drawn[name], err_msg=name)
