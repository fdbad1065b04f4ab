"""The config reference (docs/reference/config.md is generated from it): every key the overrides accept,
each with the schema's type and default, and a meaning where the schema gives one."""

from __future__ import annotations

import pytest

from shardlib.training.config import config_keys
from shardlib.training.config_reference import config_reference, config_reference_markdown

KEYS = {k.key: k for k in config_reference()}


def test_it_lists_every_key_the_overrides_accept_once():
    assert sorted(KEYS) == sorted(config_keys())
    assert len(KEYS) == len(config_reference())


@pytest.mark.parametrize(
    ("key", "type_", "default"),
    [
        ("optimizer.lr", "float > 0", "0.003"),
        ("model.d_model", "int > 0", "required"),
        ("model.moe.top_k", "int >= 1, <= 2", "2"),
        ("sharding", '"dp" | "fsdp" | "tp" | "fsdp_tp" | "hsdp" | "hsdp_tp"', "'dp'"),
        ("outer.replica_axes", 'list["data" | "data_replica" | "expert"]', "['data']"),
        ("faults.spike_factor", "float > 1 | None", "4.0"),
        ("data.paths", "list[str]", "[]"),
    ],
)
def test_a_keys_type_and_default_are_the_schemas(key, type_, default):
    assert (KEYS[key].type, KEYS[key].default) == (type_, default)


def test_a_meaning_comes_from_the_description_or_the_comment_beside_or_above_the_field():
    assert KEYS["eval_every"].description == "0: evaluate only at the last step"  # beside
    assert KEYS["pipeline.branching"].description.startswith("cond: a stage computes only its own action")  # above
    assert KEYS["outer.inner_steps"].section == "outer" and KEYS["model.moe.period"].section == "model.moe"


def test_the_markdown_has_one_table_per_section_and_a_row_per_key():
    text = config_reference_markdown()
    assert text.count("| key | type | default | meaning |") == len({k.section for k in KEYS.values()})
    assert sum(line.startswith("| <code>") for line in text.splitlines()) == len(KEYS)
    assert "&#124;" in text and "\\|" not in text  # a | inside a cell never splits it
