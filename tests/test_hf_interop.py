"""Hugging Face Llama checkpoints in and out (shardlib.interop), against the fixture of tests/make_hf_fixture.py.

(Llama 3, Qwen 2 and Mistral: tests/test_hf_families.py.)

The fixture (tests/fixtures/hf_tiny_llama) holds two tiny random Llamas saved by
transformers in bfloat16 (``untied``: six files and an index; ``tied``: one
file) and their float32 logits on a fixed batch. Imported logits must match
them within 1e-4 of their scale; export then import must be bitwise; the one
allowed skip is the test that needs ``transformers`` itself.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from shardlib.core.rules import preset_rules
from shardlib.core.sharding import tree_shardings
from shardlib.interop import hf_import
from shardlib.interop.hf_config import HFFormatError, check_model_matches, model_config_from_hf, read_hf_config
from shardlib.interop.hf_export import export_hf, parse_size
from shardlib.interop.hf_import import INDEX_FILE, load_hf_params, tensor_files
from shardlib.interop.hf_layout import LLAMA_TABLE, format_table, llama_layouts, parameters, read_param_block, to_hf
from shardlib.interop.init_from import initial_state
from shardlib.training.checkpoint import Checkpointer
from shardlib.training.config import ConfigError, config_to_dict, load_config
from shardlib.training.hf_export import export_run
from shardlib.training.setup import setup_training
from shardlib.training.train_state import abstract_model
from shardlib.training.trainer import train
from tests.hf_support import assert_params_equal, fixture_tensors, logits_of
from tests.support import mesh_of, tiny_config

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny_llama"
UNTIED, TIED = FIXTURE / "untied", FIXTURE / "tied"
TOLERANCE = 1e-4  # of the logits' scale, float32


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


def model_cfg(hf_dir: Path, **update):
    return model_config_from_hf(read_hf_config(hf_dir)).model_copy(update=update)


def shardings(cfg, preset: str, mesh):
    model = abstract_model(cfg)
    return tree_shardings(model.params, model.logical_axes, preset_rules(preset), mesh)


@pytest.fixture(scope="module")
def one_device_params():
    mesh = mesh_of(devices=1)
    cfgs = {"untied": model_cfg(UNTIED), "tied": model_cfg(TIED)}
    return {name: (cfg, load_hf_params(FIXTURE / name, cfg, shardings(cfg, "dp", mesh))) for name, cfg in cfgs.items()}


@pytest.fixture(scope="module")
def sharded():
    """The untied model imported onto fsdp_tp over 4 x 2 devices, and every safetensors read it made."""
    cfg, mesh = model_cfg(UNTIED), mesh_of(data=4, model=2)
    targets = shardings(cfg, "fsdp_tp", mesh)
    reads: list[tuple[str, tuple[slice, ...], int]] = []
    original = hf_import._Reader.read

    def recording(self, name, slices):
        block = original(self, name, slices)
        reads.append((name, slices, block.size))
        return block

    hf_import._Reader.read = recording
    try:
        params = load_hf_params(UNTIED, cfg, targets)
    finally:
        hf_import._Reader.read = original
    return cfg, targets, params, reads


# --------------------------------------------------------------------------- config and table


def test_config_maps_gqa_rope_eps_and_tied_embeddings():
    untied, tied = model_cfg(UNTIED), model_cfg(TIED)
    assert (untied.vocab_size, untied.d_model, untied.n_layers, untied.d_ff) == (256, 64, 2, 128)
    assert (untied.n_heads, untied.n_kv_heads, untied.resolved_head_dim) == (4, 2, 16)
    assert (untied.rope_theta, untied.norm_eps, untied.tie_embeddings) == (50000.0, 1e-5, False)
    assert tied.tie_embeddings and tied.d_ff == 64
    # transformers 4 wrote rope_theta at the top level and could omit head_dim and num_key_value_heads.
    legacy = read_hf_config(UNTIED)
    legacy.pop("rope_parameters"), legacy.pop("head_dim")
    assert model_config_from_hf({**legacy, "rope_theta": 50000.0, "rope_scaling": None}) == untied
    assert model_config_from_hf({**legacy, "num_key_value_heads": None}).n_kv_heads == 4


def test_the_name_table_is_printable_data():
    text = format_table()
    for hf_name, path, hf_axes, axes in LLAMA_TABLE:
        assert re.search(rf"{re.escape(hf_name)}\s+{re.escape(path)}\s+{re.escape(hf_axes)}\s+{re.escape(axes)}", text)
    assert "no q/k permutation" in text


def test_a_fused_parameter_is_read_row_by_row_for_the_entries_a_shard_holds():
    """layers/qkv of one layer from q_proj, k_proj and v_proj: whole, and for a range of slots that ends
    inside the queries' and starts in them (each HF tensor read only for its part); exported back exactly."""
    sizes = {"layer": 1, "embed": 3, "heads": 4, "kv_heads": 2, "group": 2, "head_dim": 2}
    rows = parameters(llama_layouts(tie_embeddings=True))["layers/qkv"]
    rng = np.random.default_rng(0)
    hf = {row.hf_name: rng.standard_normal(row.hf_shape(sizes)) for row in rows}
    read_rows = []

    def read(row, slices):
        read_rows.append(row.hf_name)
        return hf[row.hf_name][slices]

    whole = {"embed": (0, 3), "kv_heads": (0, 2), "group": (0, 4), "head_dim": (0, 2)}
    qkv = read_param_block(rows, sizes, whole, read)  # [D, N, G + 2, K]
    assert qkv.shape == (3, 2, 4, 2) and len(read_rows) == 3
    q = hf["model.layers.{i}.self_attn.q_proj.weight"].reshape(2, 2, 2, 3)  # [(n g) k, d] -> n, g, k, d
    np.testing.assert_array_equal(qkv[:, :, :2], q.transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(
        qkv[:, :, 2], hf["model.layers.{i}.self_attn.k_proj.weight"].reshape(2, 2, 3).transpose(2, 0, 1)
    )
    read_rows.clear()
    part = read_param_block(rows, sizes, {**whole, "group": (1, 3)}, read)  # the second query and the key
    np.testing.assert_array_equal(part, qkv[:, :, 1:3])
    assert read_rows == ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"]
    for row in rows:
        np.testing.assert_array_equal(to_hf(row, qkv, sizes), hf[row.hf_name])


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_imported_logits_match_transformers(one_device_params, reference, variant):
    cfg, params = one_device_params[variant]
    logits = logits_of(cfg, params, reference["tokens"])
    expected = reference[f"{variant}_logits"]
    error, scale = float(np.max(np.abs(logits - expected))), float(np.max(np.abs(expected)))
    print(f"{variant}: max |shardlib - transformers| {error:.3g}, scale {scale:.3g}, relative {error / scale:.3g}")
    assert error <= TOLERANCE * scale, f"{variant}: logits differ by {error:.3g} (scale {scale:.3g})"


def test_import_onto_a_sharded_mesh(sharded, one_device_params, reference):
    cfg, targets, params, reads = sharded
    for (path, leaf), target in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(targets), strict=True):
        assert leaf.sharding == target, jax.tree_util.keystr(path)
    assert params["layers"]["qkv"].sharding.spec == jax.P(None, "data", "model", None, None)
    assert params["embed"]["embedding"].sharding.spec == jax.P("model", "data")
    # Every device's shard was read on its own, each distinct shard once: per tensor, the
    # elements read add up to the tensor, and each q read is one device's [2 heads x 16, 16 of 64].
    read = {}
    for name, _, size in reads:
        read[name] = read.get(name, 0) + size
    assert read == {name: t.size for name, t in fixture_tensors(UNTIED).items()}
    q_reads = [slices for name, slices, _ in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert len(q_reads) == 8 and all(s[0].stop - s[0].start == 32 and s[1].stop - s[1].start == 16 for s in q_reads)
    # The same logits as on one device (float32 reductions may split differently).
    logits = logits_of(cfg, params, reference["tokens"])
    expected = reference["untied_logits"]
    assert np.max(np.abs(logits - expected)) <= TOLERANCE * np.max(np.abs(expected))
    single = jax.tree.map(np.asarray, one_device_params["untied"][1])
    assert_params_equal(jax.tree.map(np.asarray, params), single)


def test_layers_are_stacked_in_the_plans_order(one_device_params):
    """A pipeline's layout: stored position p holds HF layer layer_order[p]."""
    cfg, params = one_device_params["untied"]
    swapped = load_hf_params(UNTIED, cfg, shardings(cfg, "dp", mesh_of(devices=1)), layer_order=[1, 0])
    for name, leaf in params["layers"].items():
        np.testing.assert_array_equal(np.asarray(swapped["layers"][name]), np.asarray(leaf)[::-1], err_msg=name)
    assert_params_equal(swapped["embed"], params["embed"])


# --------------------------------------------------------------------------- export


def test_export_then_import_is_bitwise(sharded, tmp_path):
    cfg, targets, params, _ = sharded
    out = export_hf(params, cfg, tmp_path / "hf", max_shard_bytes=parse_size("100KB"))
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == 5 and sorted(set(index["weight_map"].values())) == files
    written = fixture_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in written.values())
    assert set(written) == set(fixture_tensors(UNTIED)) and all(t.dtype == np.float32 for t in written.values())
    assert_params_equal(load_hf_params(out, cfg, targets), params)


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_bfloat16_export_reproduces_the_checkpoint(tmp_path, variant):
    """Imported in bfloat16 and exported again: the very tensors transformers wrote."""
    cfg = model_cfg(FIXTURE / variant, param_dtype="bfloat16")
    params = load_hf_params(FIXTURE / variant, cfg, shardings(cfg, "fsdp_tp", mesh_of(data=4, model=2)))
    out = export_hf(params, cfg, tmp_path / variant)
    assert (out / "model.safetensors").is_file() and not (out / INDEX_FILE).exists()  # one file: no index
    written, original = fixture_tensors(out), fixture_tensors(FIXTURE / variant)
    assert set(written) == set(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and np.array_equal(
            written[name].view(np.uint16), tensor.view(np.uint16)
        ), name
    assert model_cfg(out, param_dtype="bfloat16") == cfg


def test_transformers_loads_the_export(one_device_params, reference, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params = one_device_params["untied"]
    out = export_hf(params, cfg, tmp_path / "hf", max_shard_bytes=parse_size("100KB"))
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.from_numpy(reference["tokens"]).long()).logits.numpy()
    expected = reference["untied_logits"]
    assert np.max(np.abs(logits - expected)) <= TOLERANCE * np.max(np.abs(expected))


# --------------------------------------------------------------------------- bad input


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_config(hf_dir: Path, **changes) -> Path:
    config = read_hf_config(hf_dir) | changes
    (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir


def rewrite_tied_weights(hf_dir: Path, edit) -> Path:
    tensors = load_file(str(hf_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return hf_dir


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: edit_config(d, model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (lambda d: edit_config(d, attention_bias=True), "attention_bias is True"),
        (
            lambda d: edit_config(d, rope_scaling={"rope_type": "dynamic", "factor": 8.0}),
            "rope_scaling has rope_type 'dynamic'",
        ),
        (
            lambda d: edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
            "rope_parameters has rope_type 'yarn'",
        ),
        (lambda d: edit_config(d, hidden_act="gelu"), "hidden_act is 'gelu'"),
        (
            lambda d: rewrite_tied_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
            "tensor model.layers.1.mlp.up_proj.weight (shardlib layers/gate_up) is missing",
        ),
        (
            lambda d: rewrite_tied_weights(d, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:32]})),
            "tensor model.norm.weight in model.safetensors has shape [32], expected [64]",
        ),
        (
            lambda d: rewrite_tied_weights(
                d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
            ),
            "no place for: model.layers.0.self_attn.q_proj.bias",
        ),
    ],
    ids=["model_type", "attention_bias", "rope_scaling", "rope_parameters", "hidden_act", "missing", "shape", "bias"],
)
def test_bad_checkpoints_are_refused_by_name(tmp_path, make, message):
    hf_dir = make(copy_of(TIED, tmp_path))
    with pytest.raises(HFFormatError, match=re.escape(message)):
        load_hf_params(hf_dir, model_cfg(TIED), shardings(model_cfg(TIED), "dp", mesh_of(devices=1)))


def test_index_naming_a_missing_file(tmp_path):
    hf_dir = copy_of(UNTIED, tmp_path)
    (hf_dir / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(
        HFFormatError, match=r"puts tensor \S+ in model-00003-of-00006.safetensors, which does not exist"
    ):
        tensor_files(hf_dir)


def test_a_model_config_that_differs_lists_the_overrides():
    cfg = model_cfg(UNTIED, norm_eps=1e-6, d_ff=256)
    with pytest.raises(HFFormatError) as err:
        load_hf_params(UNTIED, cfg, shardings(cfg, "dp", mesh_of(devices=1)))
    assert "model.d_ff is 256 but the checkpoint's intermediate_size is 128" in str(err.value)
    assert "model.norm_eps is 1e-06 but the checkpoint's rms_norm_eps is 1e-05" in str(err.value)
    assert str(err.value).endswith("Override with: model.d_ff=128 model.norm_eps=1e-05")
    moe = type(cfg).model_validate({**model_cfg(UNTIED).model_dump(), "moe": {"n_experts": 4}})
    with pytest.raises(HFFormatError, match="has no experts"):
        check_model_matches(moe, model_cfg(UNTIED), "config.json")


# --------------------------------------------------------------------------- train.py init_from=hf:...
# Without compiling a training step (seconds on 2 cores): the trainer's fresh-start path is
# initial_state, checked here directly, and train() is shown to go through it by its error.


def run_config(tmp_path: Path, **model_update):
    """A run of the untied fixture's shape with init_from=hf:<fixture>, on text tokenized by its tokenizer."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    corpus = tmp_path / "zen.txt"
    corpus.write_text(codecs.decode(this.s, "rot13") * 8)
    return tiny_config(
        tmp_path / "run",
        model=model_cfg(UNTIED, **model_update).model_dump(exclude_defaults=True),
        init_from=f"hf:{UNTIED}",
        data={"source": "text", "paths": [str(corpus)], "tokenizer": str(UNTIED), "heldout_fraction": 0.2},
        batch_size=8,
        eval_batches=0,
    )


def test_a_fresh_run_starts_from_the_checkpoint_and_exports_back(tmp_path, one_device_params):
    cfg, mesh = run_config(tmp_path), mesh_of(devices=1)
    run = setup_training(cfg, mesh)
    with jax.set_mesh(mesh):
        params, opt_state = initial_state(run, log=lambda _: None)
        assert_params_equal(params, one_device_params["untied"][1])
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(opt_state))  # zero moments, step 0
        meta = {"data_position": 0, "skipped_updates": 0, **run.checkpoint_layout()}
        with Checkpointer(tmp_path / "run" / "checkpoints", every=1, keep=1, async_save=False) as ckpt:
            ckpt.save(1, params, opt_state, meta)
        (tmp_path / "run" / "config.json").write_text(json.dumps(config_to_dict(cfg)))
        logged = []
        out = export_run(tmp_path / "run", tmp_path / "hf", mesh, log=logged.append)
    assert logged[-1].startswith("exported step 1 of")
    written = fixture_tensors(out)
    for name, tensor in fixture_tensors(UNTIED).items():
        np.testing.assert_array_equal(written[name], tensor.astype(np.float32), err_msg=name)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_train_imports_init_from_and_checks_it_against_the_model(tmp_path):
    cfg = run_config(tmp_path, norm_eps=1e-6)
    with pytest.raises(HFFormatError, match=re.escape("Override with: model.norm_eps=1e-05")):
        train(cfg, mesh_of(devices=1), progress=False, log=lambda _: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="init_from"):
        load_config(REPO / "configs" / "tiny.yaml", ["init_from=/no/prefix"])


def test_the_export_command_of_the_interop_path_says_where_it_moved(monkeypatch, capsys):
    """The run's export restores a training checkpoint, so its command is training's; the old path says so."""
    monkeypatch.setattr("sys.argv", ["shardlib.interop.hf_export", "--run-dir", "runs/x", "--out", "hf/x"])
    monkeypatch.delitem(sys.modules, "shardlib.interop.hf_export")  # run afresh as __main__, as python -m does
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("shardlib.interop.hf_export", run_name="__main__")
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "error: python -m shardlib.interop.hf_export moved to python -m shardlib.training.hf_export; "
        "run: python -m shardlib.training.hf_export --run-dir runs/x --out hf/x\n"
    )
