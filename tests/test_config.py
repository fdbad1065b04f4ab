"""Tests for shardlib.training.config: schema, shipped configs, overrides and error messages."""

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from shardlib.training.config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    config_keys,
    config_to_dict,
    load_config,
    validate_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny.yaml"

TINY_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 384}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# --- shipped configs -------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The dict form must survive JSON and validate back to the same config.
    assert validate_config(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_shipped_configs_exist():
    assert {"tiny.yaml", "small.yaml", "gpt2-124m.yaml", "1b.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}


def test_tiny_values():
    cfg = load_config(TINY)
    assert (cfg.steps, cfg.batch_size, cfg.seq_len, cfg.run_dir) == (300, 32, 128, "runs/tiny")
    assert cfg.optimizer.lr == pytest.approx(3e-3)
    assert cfg.optimizer.warmup_steps == 30
    assert cfg.checkpoint.every == 100
    assert cfg.model.resolved_head_dim == 32


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 0.5e6, 1.5e6),
        ("small", 20e6, 30e6),
        ("gpt2-124m", 110e6, 135e6),
        ("1b", 0.8e9, 1.2e9),
    ],
)
def test_param_counts(name, low, high):
    assert low <= load_config(CONFIGS / f"{name}.yaml").model.num_params() <= high


# --- model arithmetic ------------------------------------------------------------


def test_num_params_by_hand():
    m = ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=12)
    head_dim = 2
    layer = 2 * 8 + 8 * 4 * head_dim * 2 + 8 * 2 * head_dim * 2 + 3 * 8 * 12
    assert m.num_params() == 10 * 8 + 2 * layer + 8 + 8 * 10
    tied = m.model_copy(update={"tie_embeddings": True})
    assert tied.num_params() == m.num_params() - 10 * 8


def test_explicit_head_dim_changes_attention_params():
    base = ModelConfig(**TINY_MODEL)
    wide = ModelConfig(**TINY_MODEL, head_dim=64)
    assert wide.resolved_head_dim == 64
    extra_per_layer = 128 * 32 * (2 * 4 + 2 * 2)  # q, o over 4 heads, k, v over 2
    assert wide.num_params() - base.num_params() == 4 * extra_per_layer


def test_flops_per_token():
    m = ModelConfig(**TINY_MODEL)
    emb = 256 * 128
    attention = 12 * 4 * 4 * 32 * 128
    assert m.flops_per_token(128) == 6 * (m.num_params() - emb) + attention
    tied = m.model_copy(update={"tie_embeddings": True})
    # Tied: the shared matrix still does the output projection's matmul.
    assert tied.flops_per_token(128) == 6 * tied.num_params() + attention


# --- overrides -------------------------------------------------------------------


def test_dotted_and_leaf_overrides():
    cfg = load_config(TINY, ["model.d_model=256", "steps=7", "lr=1e-3", "every=5"])
    assert cfg.model.d_model == 256
    assert cfg.steps == 7
    assert cfg.optimizer.lr == 1e-3
    assert cfg.checkpoint.every == 5


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("seed=3", lambda c: c.seed, 3),
        ("optimizer.lr=1e-3", lambda c: c.optimizer.lr, 1e-3),  # YAML 1.1 reads a str
        ("weight_decay=0.05", lambda c: c.optimizer.weight_decay, 0.05),
        ("peak_tflops=1e3", lambda c: c.peak_tflops, 1000.0),
        ("peak_tflops=null", lambda c: c.peak_tflops, None),
        ("tie_embeddings=true", lambda c: c.model.tie_embeddings, True),
        ("async_save=false", lambda c: c.checkpoint.async_save, False),
        ("run_dir=runs/try1", lambda c: c.run_dir, "runs/try1"),
        ("run_dir=2024", lambda c: c.run_dir, "2024"),  # str fields keep the text
        ("sharding=fsdp", lambda c: c.sharding, "fsdp"),
        ("compute_dtype=bfloat16", lambda c: c.model.compute_dtype, "bfloat16"),
    ],
)
def test_override_types(override, getter, expected):
    assert getter(load_config(TINY, [override])) == expected


def test_list_override():
    cfg = load_config(TINY, ["data.source=text", "paths=[a.txt, b.txt]"])
    assert cfg.data.paths == ["a.txt", "b.txt"]


def test_later_override_wins_and_input_is_not_mutated():
    original = {"model": dict(TINY_MODEL), "steps": 1}
    result = apply_overrides(original, ["steps=2", "steps=3", "optimizer.lr=0.5"])
    assert result["steps"] == 3 and result["optimizer"] == {"lr": 0.5}
    assert original == {"model": dict(TINY_MODEL), "steps": 1}


def test_override_into_empty_section(tmp_path):
    path = write(
        tmp_path,
        "model: {d_model: 64, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 8}\noptimizer:\n",
    )
    assert load_config(path, ["lr=0.1"]).optimizer.lr == 0.1


def test_config_keys():
    keys = config_keys()
    assert {"steps", "model.d_model", "optimizer.lr", "data.paths", "checkpoint.every"} <= set(keys)
    assert "model" not in keys and "optimizer" not in keys
    assert len(keys) == len(set(keys))


# --- errors ----------------------------------------------------------------------


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'stpes'; did you mean: steps\?"):
        load_config(TINY, ["stpes=200"])


def test_unknown_dotted_key_suggests_dotted_match():
    with pytest.raises(ConfigError, match=r"'optimizer\.lrr'; did you mean: optimizer\.lr\b"):
        load_config(TINY, ["optimizer.lrr=1"])


def test_unknown_key_without_close_match_lists_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'zzzz'; valid keys: .*optimizer\.lr"):
        load_config(TINY, ["zzzz=1"])


def test_ambiguous_leaf_lists_candidates():
    # The shipped schema has no repeated leaf names, so use one that does.
    class Section(BaseModel):
        model_config = ConfigDict(extra="forbid")
        every: int = 1

    class Schema(BaseModel):
        model_config = ConfigDict(extra="forbid")
        log: Section = Section()
        save: Section = Section()

    with pytest.raises(ConfigError, match=r"ambiguous config key 'every'.*log\.every, save\.every"):
        apply_overrides({}, ["every=5"], model_cls=Schema)
    assert apply_overrides({}, ["save.every=5"], model_cls=Schema) == {"save": {"every": 5}}


@pytest.mark.parametrize("override", ["steps", "=3", "steps:3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match=rf"malformed override '{override}': expected key=value"):
        load_config(TINY, [override])


def test_unparsable_override_value():
    with pytest.raises(ConfigError, match=r"cannot parse the value in override 'paths=\[a'"):
        load_config(TINY, ["paths=[a"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("steps=abc", r"steps: Input should be a valid integer.*\(got 'abc'\)"),
        ("steps=0", r"steps: Input should be greater than 0 \(got 0\)"),
        ("lr=fast", r"optimizer\.lr: Input should be a valid number.*\(got 'fast'\)"),
        (
            "tie_embeddings=maybe",
            r"model\.tie_embeddings: Input should be a valid boolean.*'maybe'",
        ),
        ("sharding=pp", r"sharding: Input should be 'dp', 'fsdp'.*\(got 'pp'\)"),
        ("paths=a.txt", r"data\.paths: Input should be a valid list \(got 'a\.txt'\)"),
    ],
)
def test_type_errors_name_key_value_and_expected_type(override, pattern):
    with pytest.raises(ConfigError, match=rf"(?s)tiny\.yaml with overrides {override}:.*{pattern}"):
        load_config(TINY, [override])


def test_errors_in_file_name_file_and_keys(tmp_path):
    path = write(
        tmp_path,
        "model: {d_model: x, n_layers: 2, n_heads: 2, n_kv_heads: 1, d_ff: 4}\nstpes: 3\noptimiser: {}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"invalid config in {path}:" in message
    assert "model.d_model: Input should be a valid integer" in message and "(got 'x')" in message
    assert "stpes: unknown key; did you mean: steps?" in message
    assert "optimiser: unknown key; did you mean: optimizer" in message


def test_missing_required_field(tmp_path):
    path = write(tmp_path, "model: {d_model: 64, n_layers: 1, n_heads: 2, d_ff: 8}\n")
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads: Field required$"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(CONFIGS / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "model: {d_model: 1\n")
    with pytest.raises(ConfigError, match=rf"invalid YAML in config file {path}"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n"])
def test_top_level_must_be_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"invalid config in {path}: the top level must be a mapping"):
        load_config(path)


# --- cross-field validation ------------------------------------------------------


def test_batch_size_divisible_by_grad_accum():
    assert load_config(TINY, ["grad_accum=4"]).grad_accum == 4
    with pytest.raises(ConfigError, match=r"batch_size \(32\) must be divisible by grad_accum \(5\)"):
        load_config(TINY, ["grad_accum=5"])


def test_n_heads_multiple_of_n_kv_heads():
    with pytest.raises(ConfigError, match=r"model: n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        load_config(TINY, ["n_kv_heads=3"])


def test_head_dim_must_be_even():
    with pytest.raises(ConfigError, match=r"head_dim \(33\) must be even"):
        load_config(TINY, ["head_dim=33"])


def test_d_model_not_divisible_needs_head_dim():
    with pytest.raises(ConfigError, match=r"d_model \(130\) is not divisible by n_heads \(4\)"):
        load_config(TINY, ["d_model=130"])
    assert load_config(TINY, ["d_model=130", "head_dim=32"]).model.resolved_head_dim == 32


def test_data_paths_match_source():
    with pytest.raises(ConfigError, match=r"data: source 'bin' needs at least one file"):
        load_config(TINY, ["source=bin"])
    with pytest.raises(ConfigError, match=r"data: source 'stdlib' takes no data\.paths"):
        load_config(TINY, ["paths=[a.txt]"])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --- short names: what a leaf name alone may mean ------------------------------------------------


@pytest.mark.parametrize(
    "override, keys",
    [
        # The run's AdamW or DiLoCo's outer SGD? A word for two settings is an error naming both.
        ("learning_rate=1e-3", "optimizer.lr, outer.learning_rate"),
        ("compression=int8", "grad_compression, outer.compression"),
        ("momentum=0.95", "optimizer.b1, outer.momentum"),
    ],
)
def test_a_word_for_settings_of_two_sections_is_ambiguous(override, keys):
    with pytest.raises(
        ConfigError, match=rf"ambiguous config key '{override.split('=')[0]}'; use the full name: {keys}$"
    ):
        load_config(TINY, [override])
    diloco = ["outer.algorithm=diloco", "outer.inner_steps=4"]
    with pytest.raises(ConfigError, match="ambiguous"):  # on with DiLoCo as well: both sections are read then
        load_config(TINY, [*diloco, override])


@pytest.mark.parametrize(
    "override, key, switch",
    [
        ("nesterov=false", "outer.nesterov", "outer.algorithm"),
        ("inner_steps=8", "outer.inner_steps", "outer.algorithm"),
        ("mixing=0.5", "outer.mixing", "outer.algorithm"),
        ("top_k=1", "model.moe.top_k", "model.moe.n_experts"),
    ],
)
def test_a_short_name_in_a_section_the_run_does_not_read_is_refused(override, key, switch):
    """tiny runs without DiLoCo and without experts: these would be set and never read."""
    with pytest.raises(
        ConfigError, match=rf"override '{override}' sets {key}, which this run never reads \({switch} is"
    ):
        load_config(TINY, [override])
    assert load_config(TINY, [f"{key}={override.split('=')[1]}"])  # the full name sets it on purpose


def test_a_short_name_in_a_section_the_run_reads_is_set():
    cfg = load_config(TINY, ["nesterov=false", "algorithm=diloco", "inner_steps=4"])  # order does not matter
    assert (cfg.outer.algorithm, cfg.outer.nesterov, cfg.outer.inner_steps) == ("diloco", False, 4)
    assert load_config(TINY, ["n_experts=4", "top_k=1"]).model.moe.top_k == 1
    assert load_config(TINY, ["lr=1e-3"]).optimizer.lr == 1e-3  # lr stays the optimizer's


@pytest.mark.parametrize(
    "text, hint",
    [
        ("learning_rate: 1.0e-3\n", "learning_rate: unknown key; did you mean: optimizer.lr, outer.learning_rate?"),
        ("optimizer: {learning_rate: 1.0e-3}\n", "did you mean: optimizer.lr, outer.learning_rate"),
    ],
)
def test_a_file_key_of_another_name_hints_every_setting_it_may_mean(tmp_path, text, hint):
    model = "model: {d_model: 64, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 8}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, model + text))
    assert hint in str(info.value)


def test_a_mistyped_word_hints_every_setting_it_may_mean():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'lerning_rate'; did you mean: optimizer\.lr, outer\.lea"
    ):
        load_config(TINY, ["lerning_rate=1e-3"])


# --- DiLoCo's overlap --------------------------------------------------------------------------


def test_an_overlapped_outer_step_keeps_half_of_each_replicas_step_by_default():
    """Streaming DiLoCo's alpha (Douillard et al. 2025, Figs. 8, 10: alpha = 0.5 with tau = 1): at 0, every
    replica would throw away the inner step that ran beside the all-reduce, on the fragment."""
    diloco = ["outer.algorithm=diloco", "outer.inner_steps=4"]
    assert load_config(TINY, [*diloco, "outer.overlap_steps=1"]).outer.mixing == 0.5
    assert load_config(TINY, [*diloco, "outer.overlap_steps=1", "outer.mixing=0"]).outer.mixing == 0.0  # as written
    assert load_config(TINY, diloco).outer.mixing == 0.0  # no overlap: each replica restarts from the anchor
    cfg = load_config(TINY, [*diloco, "outer.overlap_steps=1"])
    assert validate_config(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
