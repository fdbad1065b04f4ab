"""The pipeline executor on models shardlib did not write, against one device (fp32, 1e-5 of each leaf's scale).

A Linen decoder in the common open-source style (its own names, ``nn.scan``
over its blocks, its own causal attention) trained through every schedule on
pipe 2 x data 2 (and pipe 4 once), with the zero-bubble split derived from
its ``nn.Dense`` kernels (``flax_layers.linen_layer``); an NNX model stacked
with ``nnx.vmap`` under 1F1B; a pytree activation (hidden states beside a
per-token mask) and per-microbatch inputs beyond tokens and targets; a mesh
whose pipeline axis is called ``stage``; and the layering fact that the
pipeline package imports no model.
"""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.core.patterns import match_logical_axes
from shardlib.core.rules import preset_rules, rename_mesh_axes
from shardlib.core.sharding import tree_specs
from shardlib.parallel.pipeline.executor import pipeline_loss_and_grads
from shardlib.parallel.pipeline.flax_layers import linen_layer, merge_stacked, nnx_layer, split_stacked
from shardlib.parallel.pipeline.plan import PipelineSettings, pipeline_axis, plan_pipeline
from shardlib.parallel.pipeline.stacked import stacked_stage_functions
from tests.support import assert_trees_close

REL = 1e-5  # loss and every gradient leaf: relative to its own scale (tests.support.assert_trees_close)
VOCAB, D, HEADS, FF, LAYERS, BATCH, LENGTH, MICRO = 32, 16, 2, 32, 4, 8, 8, 4


# A decoder as other codebases write it: its own names, nn.scan over blocks, its own attention.
class CausalSelfAttention(nn.Module):
    n_heads: int

    @nn.compact
    def __call__(self, x, keep=None):
        b, length, d = x.shape
        q, k, v = (nn.Dense(d, use_bias=False, name=n)(x).reshape(b, length, self.n_heads, -1) for n in "qkv")
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(d // self.n_heads)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if keep is not None:  # padding: a masked position is never attended to
            allowed = allowed & keep[:, None, None, :]
        weights = jax.nn.softmax(jnp.where(allowed, logits, -1e9), axis=-1)
        out = jnp.einsum("bhqs,bshk->bqhk", weights, v).reshape(b, length, d)
        return nn.Dense(d, name="proj")(out)


class Block(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        x, keep = (carry["h"], carry["keep"]) if isinstance(carry, dict) else (carry, None)
        x = x + CausalSelfAttention(HEADS, name="attn")(nn.LayerNorm(name="ln_1")(x), keep)
        h = nn.gelu(nn.Dense(FF, name="fc")(nn.LayerNorm(name="ln_2")(x)))
        x = x + nn.Dense(D, name="out")(h)
        return ({"h": x, "keep": keep} if keep is not None else x), None


class Decoder(nn.Module):
    def setup(self):
        self.wte = nn.Embed(VOCAB, D)
        self.blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)()
        self.ln_f = nn.LayerNorm()
        self.lm_head = nn.Dense(VOCAB, use_bias=False)

    def embed(self, tokens):
        return self.wte(tokens)

    def head(self, x):
        return self.lm_head(self.ln_f(x))

    def __call__(self, tokens, keep=None):
        carry = self.embed(tokens) if keep is None else {"h": self.embed(tokens), "keep": keep}
        carry, _ = self.blocks(carry, None)
        return self.head(carry if keep is None else carry["h"])


def token_loss(logits, targets, weights=None):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.mean(losses if weights is None else losses * weights)  # a mean: microbatches' means average to it


def linen_pieces(masked: bool = False):
    """(embed, layer, loss, weight uses) of the Linen decoder, for the executor."""
    model = Decoder()
    layer, uses = linen_layer(Block())

    def embed(outer, mb):
        x = model.apply({"params": outer}, mb["tokens"], method=Decoder.embed)
        return {"h": x, "keep": mb["keep"]} if masked else x

    def loss(outer, x, mb):
        logits = model.apply({"params": outer}, x["h"] if masked else x, method=Decoder.head)
        return token_loss(logits, mb["targets"], mb["weights"] if masked else None)

    return embed, layer, loss, uses


def batch(seed=0, masked=False):
    rng = np.random.default_rng(seed)
    data = {
        "tokens": rng.integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32),
        "targets": rng.integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32),
    }
    if masked:  # padding anywhere but the first token, attended to by none; per-token loss weights
        keep = rng.random((BATCH, LENGTH)) > 0.3
        keep[:, 0] = True
        data["keep"] = keep
        data["weights"] = rng.random((BATCH, LENGTH)).astype(np.float32)
    return data


@pytest.fixture(scope="module")
def linen_params():
    return Decoder().init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))["params"]


def linen_reference(params, data, masked=False):
    def loss_fn(p):
        logits = Decoder().apply({"params": p}, data["tokens"], data["keep"] if masked else None)
        return token_loss(logits, data["targets"], data["weights"] if masked else None)

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def linen_ref(linen_params):
    return jax.device_get(linen_reference(linen_params, batch()))


def microbatched(data, mesh, data_axis):
    """[B, ...] -> [M, B/M, ...] per leaf, rows over ``data_axis``."""
    out = {}
    for name, a in data.items():
        a = a.reshape(MICRO, BATCH // MICRO, *a.shape[1:])
        out[name] = jax.device_put(a, NamedSharding(mesh, P(None, data_axis)))
    return out


def run_pipeline(
    fns,
    params,
    data,
    mesh,
    schedule,
    virtual=1,
    pipe="pipe",
    data_axis="data",
    stack="blocks",
    plan_axis=None,
    specs=None,
):
    """(loss, grads in the params' tree) of one step through the executor, the stack's in logical order.

    ``specs``: each parameter's PartitionSpec in the params' tree (default: the stack over ``pipe``,
    the rest replicated)."""
    settings = PipelineSettings(schedule, MICRO, virtual)
    plan = plan_pipeline(
        settings,
        mesh.shape[pipe],
        LAYERS,
        BATCH,
        collectives_inside_stages=False,
        platform="cpu",
        axis=plan_axis or pipe,
    )
    stacked, outer = split_stacked(params, stack)
    stacked = jax.tree.map(lambda w: w[plan.layer_order], stacked)  # the pipeline's storage order
    if specs is None:
        stacked_specs, outer_specs = jax.tree.map(lambda _: P(pipe), stacked), jax.tree.map(lambda _: P(), outer)
    else:
        stacked_specs, outer_specs = split_stacked(specs, stack)
    stacked = jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)), stacked, stacked_specs)
    outer = jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)), outer, outer_specs)

    @jax.jit
    def step(stacked, outer, inputs):
        return pipeline_loss_and_grads(
            plan.table,
            fns,
            stacked,
            outer,
            inputs,
            mesh,
            plan.branching,
            layer_specs=stacked_specs if specs is not None else None,
            outer_specs=outer_specs if specs is not None else None,
            batch_axes=(data_axis,),
            pipe_axis=plan.axis,
        )

    loss, d_stacked, d_outer, _ = step(stacked, outer, microbatched(data, mesh, data_axis))
    inverse = np.argsort(plan.layer_order)
    d_stacked = jax.tree.map(lambda g: np.asarray(g)[inverse], jax.device_get(d_stacked))  # logical order
    return float(loss), merge_stacked(d_stacked, jax.device_get(d_outer), stack)


def mesh(axis_type=jax.sharding.AxisType.Explicit, **sizes):
    names, shape = tuple(sizes), tuple(sizes.values())
    devices = jax.devices()[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names), devices=devices)


def assert_matches(loss, grads, ref):
    ref_loss, ref_grads = ref
    assert abs(loss - float(ref_loss)) <= REL * abs(float(ref_loss)), (loss, float(ref_loss))
    assert_trees_close(grads, ref_grads, rel=REL, what="gradient")


SCHEDULES = {  # schedule, virtual stages, pipe
    "gpipe": ("gpipe", 1, 2),
    "1f1b": ("1f1b", 1, 2),
    "interleaved-1f1b-v2": ("interleaved-1f1b", 2, 2),
    "zb-h1": ("zb-h1", 1, 2),
    "zb-v": ("zb-v", 2, 2),
    "1f1b-pipe4": ("1f1b", 1, 4),
}


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_linen_scanned_decoder_matches_one_device(case, linen_params, linen_ref):
    schedule, virtual, pipe = SCHEDULES[case]
    embed, layer, loss, uses = linen_pieces()
    fns = stacked_stage_functions(embed, layer, loss, weight_uses=uses)
    got = run_pipeline(fns, linen_params, batch(), mesh(pipe=pipe, data=2), schedule, virtual)
    assert_matches(*got, linen_ref)


def test_split_without_a_weight_use_hook_runs_unsplit(linen_params, linen_ref):
    """No weight-use table: a zero-bubble table's B computes both gradients, its W nothing; same numbers."""
    embed, _, loss, _ = linen_pieces()
    layer, uses = linen_layer(Block(), route_dense=False)
    assert uses is None
    fns = stacked_stage_functions(embed, layer, loss)
    assert not fns.splits
    assert_matches(*run_pipeline(fns, linen_params, batch(), mesh(pipe=2, data=2), "zb-h1"), linen_ref)


def test_derived_weight_gradients_are_deferred_to_w(linen_params):
    """The derived B takes no Dense kernel's gradient (its taps stop them) and W takes only those:
    the two halves add up to the whole layer gradient, and neither is the whole."""
    _, layer, _, uses = linen_pieces()
    fns = stacked_stage_functions(None, layer, None, weight_uses=uses)
    chunk = jax.tree.map(lambda w: w[:2], linen_params["blocks"])
    x = jax.random.normal(jax.random.key(1), (2, LENGTH, D))
    dy = jax.random.normal(jax.random.key(2), (2, LENGTH, D))
    _, inputs, outputs = fns.tapped_stage(chunk, x, None)
    probes = jax.tree.map(jnp.zeros_like, outputs)
    _, pull, inputs = jax.vjp(lambda c, p: fns.tapped_stage(c, x, p)[:2], chunk, probes, has_aux=True)
    d_b, dys = pull(dy)
    d_w = fns.weight_grads(chunk, inputs, dys)
    whole = jax.vjp(lambda c: fns.stage(c, x), chunk)[1](dy)[0]
    assert_trees_close(jax.tree.map(jnp.add, d_b, d_w), whole, rel=REL)
    assert float(jnp.max(jnp.abs(d_b["attn"]["q"]["kernel"]))) == 0.0  # deferred
    assert float(jnp.max(jnp.abs(d_w["ln_1"]["scale"]))) == 0.0  # not a Dense: B's
    assert float(jnp.max(jnp.abs(d_w["fc"]["bias"]))) == 0.0  # a bias: B's


def test_pytree_activation_with_a_mask_matches_one_device(linen_params):
    """Hidden states and a boolean per-token mask pass between the stages; the inputs carry the mask
    and the loss weights beside tokens and targets."""
    data = batch(1, masked=True)
    ref = jax.device_get(linen_reference(linen_params, data, masked=True))
    embed, layer, loss, uses = linen_pieces(masked=True)
    fns = stacked_stage_functions(embed, layer, loss, weight_uses=uses)
    assert_matches(*run_pipeline(fns, linen_params, data, mesh(pipe=2, data=2), "zb-v", 2), ref)


# The decoder's parameters in shardlib's logical names, by path (it carries no annotations).
LINEN_AXES = (
    (r"blocks/attn/(q|k|v)/kernel", ("layers", "embed", "heads")),
    (r"blocks/attn/proj/kernel", ("layers", "heads", "embed")),
    (r"blocks/attn/proj/bias", ("layers", "embed")),
    (r"blocks/fc/kernel", ("layers", "embed", "mlp")),
    (r"blocks/fc/bias", ("layers", "mlp")),
    (r"blocks/out/kernel", ("layers", "mlp", "embed")),
    (r"blocks/out/bias", ("layers", "embed")),
    (r"blocks/ln_\d/(scale|bias)", ("layers", None)),
    (r"wte/embedding", ("vocab", "embed")),
    (r"ln_f/(scale|bias)", (None,)),
    (r"lm_head/kernel", ("embed", "vocab")),
)


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_the_rules_presets_compose_with_a_foreign_pipeline(preset, linen_params, linen_ref):
    """FSDP (weights over ``data``, gathered per step by the executor) and tensor parallelism (``model``,
    left to the partitioner inside the stages) on pipe 2 x data 2 x model 2, the specs from shardlib's rules."""
    m = mesh(jax.sharding.AxisType.Auto, pipe=2, data=2, model=2)
    rules = preset_rules(preset, mesh=m)
    specs = tree_specs(linen_params, match_logical_axes(linen_params, LINEN_AXES), rules, m)
    assert specs["blocks"]["fc"]["kernel"] == (
        P("pipe", "data", "model") if preset == "fsdp_tp" else P("pipe", "data", None)
    )
    embed, layer, loss, uses = linen_pieces()
    fns = stacked_stage_functions(embed, layer, loss, weight_uses=uses)
    assert_matches(*run_pipeline(fns, linen_params, batch(), m, "zb-h1", specs=specs), linen_ref)


def test_a_pipeline_axis_of_another_name(linen_params, linen_ref):
    """A project's mesh calls its axes ``stage`` and ``batch``: the rules' renaming names the pipeline's axis."""
    rules = rename_mesh_axes(preset_rules("dp"), {"pipe": "stage", "data": "batch"})
    axis = pipeline_axis(rules)
    assert axis == "stage"
    embed, layer, loss, uses = linen_pieces()
    fns = stacked_stage_functions(embed, layer, loss, weight_uses=uses)
    got = run_pipeline(fns, linen_params, batch(), mesh(stage=2, batch=2), "1f1b", pipe=axis, data_axis="batch")
    assert_matches(*got, linen_ref)


def test_the_pipeline_axis_must_be_the_meshs(linen_params):
    """The default axis name on a mesh without it is refused, naming the axis and the mesh's."""
    embed, layer, loss, uses = linen_pieces()
    fns = stacked_stage_functions(embed, layer, loss, weight_uses=uses)
    with pytest.raises(ValueError, match=r"pipe_axis names \['pipe'\], not axes of the mesh"):
        run_pipeline(fns, linen_params, batch(), mesh(stage=2, data=2), "1f1b", pipe="stage", plan_axis="pipe")


# An NNX model stacked with nnx.vmap, run with nnx.scan, as NNX codebases write it.
class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, FF, rngs=rngs)
        self.down = nnx.Linear(FF, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.head(run(self.embed(tokens), self.blocks))


def test_nnx_stacked_model_under_1f1b_matches_one_device():
    model = NnxModel(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    data = batch(2)

    def reference(p):
        return token_loss(nnx.merge(graphdef, p)(data["tokens"]), data["targets"])

    ref = jax.device_get(jax.jit(jax.value_and_grad(reference))(params))
    layer = nnx_layer(model.blocks)

    def whole(outer):  # the model with the stack's placeholders: embed and head read only their own
        stack = jax.tree.map(lambda a: jnp.zeros((1, *a.shape[1:]), a.dtype), params["blocks"])
        return nnx.merge(graphdef, merge_stacked(stack, outer, "blocks"))

    fns = stacked_stage_functions(
        lambda outer, mb: whole(outer).embed(mb["tokens"]),
        layer,
        lambda outer, x, mb: token_loss(whole(outer).head(x), mb["targets"]),
    )
    got = run_pipeline(fns, params, data, mesh(pipe=2, data=2), "1f1b")
    assert_matches(*got, ref)


def test_the_pipeline_package_imports_no_model():
    """shardlib/parallel/pipeline imports neither the model zoo nor the training layer."""
    root = pathlib.Path(__file__).resolve().parents[1] / "shardlib" / "parallel" / "pipeline"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(("shardlib.models", "shardlib.training", "models"))]
            assert not bad, f"{path.name} imports {bad}"
