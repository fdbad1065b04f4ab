"""Llama 3 (rope scaling), Qwen 2 (q/k/v biases, tied) and Mistral (sliding window) checkpoints in and out.

The fixture (tests/fixtures/hf_families, written by ``tests/make_hf_fixture.py --families``)
holds one tiny random model per family saved by transformers in bfloat16 and their float32
logits on a fixed batch. Imported logits must match them within 1e-4 of their scale, on one
device and on 8 (fsdp_tp), where every device reads only its own slices of each tensor;
export then import must be bitwise, and a bfloat16 export must be the very files transformers
wrote. The new model options are checked where the training step uses them: the q/k/v bias's
gradient through the per-use reduction and through a split (zero-bubble) backward.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from shardlib.core.rules import preset_rules
from shardlib.core.sharding import tree_shardings
from shardlib.interop import hf_import
from shardlib.interop.hf_config import HFFormatError, check_model_matches, model_config_from_hf, read_hf_config
from shardlib.interop.hf_export import export_hf
from shardlib.interop.hf_import import load_hf_params
from shardlib.models.layers import (
    BlockWeights,
    Llama3RopeScaling,
    WeightTap,
    block_attention,
    causal_gqa_attention,
    decoder_block,
    rope_frequencies,
    weight_grads,
)
from shardlib.training.step import weight_use
from shardlib.training.train_state import abstract_model
from tests.hf_support import assert_params_equal, fixture_tensors, logits_of
from tests.support import assert_trees_close, first_batch, mesh_of, tiny_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hf_families"
FAMILIES = ("llama3", "qwen2", "mistral")
TOLERANCE = 1e-4  # of the logits' scale, float32


def model_cfg(family: str, **update):
    return model_config_from_hf(read_hf_config(FIXTURE / family)).model_copy(update=update)


def shardings(cfg, preset: str, mesh):
    model = abstract_model(cfg)
    return tree_shardings(model.params, model.logical_axes, preset_rules(preset), mesh)


def relative_error(logits: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(logits - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def sharded():
    """Each family imported onto fsdp_tp over 4 x 2 devices, with every safetensors read it made."""
    mesh = mesh_of(data=4, model=2)
    out = {}
    original = hf_import._Reader.read
    for family in FAMILIES:
        cfg = model_cfg(family)
        targets = shardings(cfg, "fsdp_tp", mesh)
        reads: list[tuple[str, tuple[slice, ...], int]] = []

        def recording(self, name, slices, reads=reads):
            block = original(self, name, slices)
            reads.append((name, slices, block.size))
            return block

        hf_import._Reader.read = recording
        try:
            out[family] = (cfg, targets, load_hf_params(FIXTURE / family, cfg, targets), reads)
        finally:
            hf_import._Reader.read = original
    return out


# --------------------------------------------------------------------------- config


def test_each_family_maps_to_its_model_options():
    llama3, qwen2, mistral = (model_cfg(f) for f in FAMILIES)
    assert llama3.rope_scaling.model_dump() == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    assert (llama3.qkv_bias, llama3.sliding_window, llama3.tie_embeddings) == (False, None, False)
    assert (qwen2.qkv_bias, qwen2.tie_embeddings, qwen2.rope_theta, qwen2.sliding_window) == (True, True, 1e6, None)
    assert (mistral.sliding_window, mistral.qkv_bias, mistral.rope_scaling) == (5, False, None)
    # transformers 4 wrote llama3's scaling as rope_scaling and the base as rope_theta.
    legacy = read_hf_config(FIXTURE / "llama3")
    scaling = {k: v for k, v in legacy.pop("rope_parameters").items() if k != "rope_theta"}
    assert model_config_from_hf({**legacy, "rope_theta": 50000.0, "rope_scaling": scaling}) == llama3
    # transformers 4's Qwen 2 had no layer_types: use_sliding_window false means no window at all.
    qwen = read_hf_config(FIXTURE / "qwen2")
    qwen.pop("layer_types")
    assert model_config_from_hf({**qwen, "sliding_window": 32768, "max_window_layers": 21}) == qwen2
    windowed = {**qwen, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}
    assert model_config_from_hf(windowed).sliding_window == 8


def test_llama3_frequencies_fall_in_all_three_bands():
    """The fixture's scaling keeps 1 frequency, interpolates 1 and divides 6 by 8 (the formula's three cases)."""
    scaling = Llama3RopeScaling(**model_cfg("llama3").rope_scaling.model_dump(exclude={"rope_type"}))
    ratio = np.asarray(rope_frequencies(16, 50000.0)) / np.asarray(rope_frequencies(16, 50000.0, scaling))
    np.testing.assert_allclose(ratio[0], 1.0, rtol=1e-6)
    # The middle band, by transformers' formula: smooth = (original / wavelength - low) / (high - low),
    # f' = (1 - smooth) f / factor + smooth f.
    f = float(np.asarray(rope_frequencies(16, 50000.0))[1])
    smooth = (scaling.original_max_position_embeddings * f / (2 * np.pi) - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    assert 0.0 < smooth < 1.0
    np.testing.assert_allclose(ratio[1], 1.0 / ((1 - smooth) / scaling.factor + smooth), rtol=1e-5)
    np.testing.assert_allclose(ratio[2:], 8.0, rtol=1e-6)


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers(reference, family):
    cfg = model_cfg(family)
    params = load_hf_params(FIXTURE / family, cfg, shardings(cfg, "dp", mesh_of(devices=1)))
    error = relative_error(logits_of(cfg, params, reference["tokens"]), reference[f"{family}_logits"])
    print(f"{family}: max |shardlib - transformers| / scale = {error:.3g}")
    assert error <= TOLERANCE, f"{family}: logits differ by {error:.3g} of their scale"


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_import_reads_each_devices_slices_only(sharded, reference, family):
    """On 8 devices every distinct shard is read once, and only it: per tensor the elements read add up
    to the tensor, and no read of a tensor split over the mesh covers all of it."""
    cfg, targets, params, reads = sharded[family]
    for (path, leaf), target in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(targets), strict=True):
        assert leaf.sharding == target, jax.tree_util.keystr(path)
    tensors = fixture_tensors(FIXTURE / family)
    read: dict[str, int] = {}
    for name, _, size in reads:
        read[name] = read.get(name, 0) + size
    assert read == {name: t.size for name, t in tensors.items()}
    # Under fsdp_tp every tensor is split over data (embed) or model (heads, mlp, vocab): no read is whole.
    whole = {name for name, _, size in reads if size == tensors[name].size}
    assert not whole, sorted(whole)
    if family == "qwen2":  # the biases are split over kv heads (model): each read is one of the 2 halves
        bias_reads = [s for name, s, _ in reads if name == "model.layers.0.self_attn.q_proj.bias"]
        assert [(s[0].start, s[0].stop) for s in bias_reads] == [(0, 32), (32, 64)]
        assert params["layers"]["qkv_bias"].sharding.spec == jax.P(None, "model", None, None)
    error = relative_error(logits_of(cfg, params, reference["tokens"]), reference[f"{family}_logits"])
    assert error <= TOLERANCE, f"{family} on 8 devices: logits differ by {error:.3g} of their scale"


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_is_bitwise(sharded, tmp_path, family):
    cfg, targets, params, _ = sharded[family]
    out = export_hf(params, cfg, tmp_path / family)
    config = read_hf_config(out)
    expected_type = {"llama3": "llama", "qwen2": "qwen2", "mistral": "mistral"}[family]
    assert config["model_type"] == expected_type
    assert config["architectures"] == read_hf_config(FIXTURE / family)["architectures"]
    assert model_config_from_hf(config) == cfg
    assert set(fixture_tensors(out)) == set(fixture_tensors(FIXTURE / family))
    assert_params_equal(load_hf_params(out, cfg, targets), params)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_export_reproduces_the_checkpoint(tmp_path, family):
    """Imported in bfloat16 on 8 devices and exported again: the very tensors transformers wrote."""
    cfg = model_cfg(family, param_dtype="bfloat16")
    params = load_hf_params(FIXTURE / family, cfg, shardings(cfg, "fsdp_tp", mesh_of(data=4, model=2)))
    written, original = fixture_tensors(export_hf(params, cfg, tmp_path / family)), fixture_tensors(FIXTURE / family)
    assert set(written) == set(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and np.array_equal(
            written[name].view(np.uint16), tensor.view(np.uint16)
        ), name


# --------------------------------------------------------------------------- refused


def edited(family: str, tmp_path: Path, **changes) -> Path:
    hf_dir = Path(shutil.copytree(FIXTURE / family, tmp_path / family))
    (hf_dir / "config.json").write_text(json.dumps(read_hf_config(hf_dir) | changes))
    return hf_dir


@pytest.mark.parametrize(
    "family, changes, message",
    [
        (
            "qwen2",
            {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4},
            "only layers [1] of 2 have a sliding window",
        ),
        (
            "llama3",
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
            "rope_parameters of rope_type 'llama3' has no low_freq_factor, high_freq_factor",
        ),
        (
            "llama3",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters has rope_type 'yarn'",
        ),
        ("mistral", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ],
    ids=["per_layer_windows", "llama3_incomplete", "yarn", "activation"],
)
def test_what_shardlib_cannot_compute_is_refused_by_name(tmp_path, family, changes, message):
    hf_dir = edited(family, tmp_path, **changes)
    with pytest.raises(HFFormatError, match=re.escape(message)):
        model_config_from_hf(read_hf_config(hf_dir))


def test_a_run_config_without_the_families_options_lists_them():
    plain = model_cfg("qwen2", qkv_bias=False, tie_embeddings=True)
    with pytest.raises(HFFormatError) as err:
        check_model_matches(plain, model_cfg("qwen2"), "config.json")
    assert str(err.value).endswith("Override with: model.qkv_bias=true")
    with pytest.raises(HFFormatError) as err:
        check_model_matches(model_cfg("llama3", rope_scaling=None), model_cfg("llama3"), "config.json")
    assert 'model.rope_scaling={"rope_type":"llama3","factor":8.0,' in str(err.value)


def test_a_sliding_window_is_refused_where_the_runs_attention_cannot_apply_it():
    """The run's attention kernels mask by position only: accepted while the window cuts nothing."""

    def kernel(*args):
        return causal_gqa_attention(*args)

    with pytest.raises(ValueError, match=r"model.sliding_window=5 is shorter than the 16-token sequence"):
        block_attention(kernel, 5, 16)
    assert block_attention(kernel, 16, 16) is kernel
    assert block_attention(None, None, 16) is causal_gqa_attention
    assert block_attention(causal_gqa_attention, 5, 16) is not causal_gqa_attention  # the windowed dense one
    # A run's config refuses it before anything is traced (a pipeline stage's block of a sequence sharded
    # over seq would be shorter than seq_len, so block_attention alone could miss it).
    with pytest.raises(ValueError, match=r"model.sliding_window=5 is shorter than seq_len \(16\)"):
        tiny_config(model={"sliding_window": 5})
    run, batch, params = first_batch(tiny_config(model={"sliding_window": 16}), mesh_of(devices=1))
    assert jax.eval_shape(run.grads, params, batch)[0].shape == ()


# --------------------------------------------------------------------------- the bias in training


def test_the_qkv_bias_gradient_of_a_split_backward_is_autodiffs():
    """``weight_grads`` (a zero-bubble pipeline's W pass) from a tap: the bias's gradient is the sum of
    its output's cotangent, as jax.grad of the whole layer gives it."""
    keys = iter(jax.random.split(jax.random.key(0), 9))
    d, n, s, k, f = 8, 2, 4, 4, 12

    def draw(*shape):
        return jax.random.normal(next(keys), shape) / 3

    w = BlockWeights(
        1 + draw(d), draw(d, n, s, k), draw(n * (s - 2), k, d), 1 + draw(d), draw(d, 2, f), draw(f, d), draw(n, s, k)
    )
    x, positions = draw(2, 6, d), jnp.broadcast_to(jnp.arange(6), (2, 6))
    layer = {"rope_theta": 1e4, "norm_eps": 1e-6, "sliding_window": 3}

    def loss(w, probes=None):
        tap = WeightTap(probes)
        y = decoder_block(x, w, positions, use=tap, **layer)
        return jnp.sum(jnp.sin(y)), tap

    expected = jax.grad(lambda w: loss(w)[0])(w)
    _, tap = loss(w)
    probes = {name: jnp.zeros_like(y) for name, y in tap.outputs.items()}
    assert "qkv_bias" in probes
    dys = jax.grad(lambda p: loss(w, p)[0])(probes)
    got = weight_grads(w, loss(w, probes)[1].inputs, dys)
    assert got._asdict().keys() == expected._asdict().keys()
    assert_trees_close(got._asdict(), expected._asdict(), rel=1e-5, what="gradient")
    assert float(jnp.max(jnp.abs(expected.qkv_bias))) > 1e-2


@pytest.fixture(scope="module")
def bias_model_grads():
    """(loss, grads) of one batch for a Qwen-like tiny model with llama3 rope scaling, on 1 and 8 devices."""
    model = {"qkv_bias": True, "sliding_window": 16,
             "rope_scaling": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}}  # fmt: skip
    out = {}
    for name, preset, mesh in (("one", "dp", mesh_of(devices=1)), ("fsdp_tp", "fsdp_tp", mesh_of(data=4, model=2))):
        cfg = tiny_config(model=model, sharding=preset)
        run, batch, params = first_batch(cfg, mesh)
        bias = params["layers"]["qkv_bias"]
        noise = jax.random.normal(jax.random.key(1), bias.shape, bias.dtype) / 4  # not HF's zeros: it then counts
        params["layers"]["qkv_bias"] = jax.device_put(noise, bias.sharding)
        loss, grads = run.grads(params, batch)
        out[name] = (float(loss), jax.device_get(grads), run)
    return out


def test_the_bias_trains_alike_on_8_devices(bias_model_grads):
    """fsdp_tp's step reduces each weight use's gradient itself (the bias's included): the same loss and
    gradients as one device, each leaf within 1e-5 of its scale."""
    (loss, grads, _), (ref_loss, ref_grads, _) = bias_model_grads["fsdp_tp"], bias_model_grads["one"]
    assert abs(loss - ref_loss) <= 1e-5
    assert "qkv_bias" in grads["layers"] and float(np.max(np.abs(ref_grads["layers"]["qkv_bias"]))) > 1e-4
    run = bias_model_grads["fsdp_tp"][2]
    assert "qkv_bias" in weight_use(run.plan, run.shardings).weight_specs  # reduced by its own use
    assert_trees_close(grads, ref_grads, rel=1e-5, what="gradient")
