"""The config reference (docs/reference/config.md is generated from it): every key the overrides accept,
each with the schema's type, default and meaning, one table per section."""

from shardlib.training.config import config_keys
from shardlib.training.config_help import config_reference, config_reference_markdown

KEYS = {row.key: row for row in config_reference()}


def test_it_lists_every_key_the_overrides_accept_once():
    assert sorted(KEYS) == sorted(config_keys())
    assert len(KEYS) == len(config_reference())


def test_the_markdown_has_one_table_per_section_and_a_row_per_key():
    text = config_reference_markdown()
    sections = {key.rpartition(".")[0] for key in KEYS}
    assert text.count("| key | type | default | meaning |") == len(sections)
    assert sum(line.startswith("| <code>") for line in text.splitlines()) == len(KEYS)
    assert "| <code>model.moe.top_k</code> | <code>int &gt;= 1, &lt;= 2</code> | <code>2</code> |" in text
    assert "&#124;" in text and "\\|" not in text  # a | inside a cell never splits it
