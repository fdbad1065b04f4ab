"""Every config key with its type, default and meaning, read from the schema.

``shardlib train --help-config`` prints ``format_config_help``; the docs' config reference page
(``docs/hooks.py``) is ``config_reference_markdown``: the same rows, one table per section.

The meaning is each field's ``description`` in :mod:`shardlib.training.config_schema` and
:mod:`shardlib.models.config`; the type and its bounds come from the annotation, the default from
the field. Keys are the dotted names an override takes (``model.moe.top_k=1``).
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import types
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from shardlib.training.config import Config, _leaf_fields

REQUIRED = "required"  # the default column of a key without a default


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of the schema: ``key`` as an override writes it, its type, default and meaning."""

    key: str
    type: str  # e.g. "int > 0", "stdlib | text | bin", "float > 1 | null"
    default: str  # as YAML writes it ("null", "true", "[]"), or REQUIRED
    meaning: str


# The constraints pydantic keeps in a field's metadata (annotated_types' Gt, Ge, ...), by attribute.
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _bounds(metadata: typing.Iterable[object]) -> str:
    """The bounds of a field, as in ``int > 0``, ``float >= 0, <= 1``, ``str matching ^hf:.+``."""
    parts = []
    for item in metadata:
        for attribute, sign in _BOUNDS:
            if (bound := getattr(item, attribute, None)) is not None:
                parts.append(f"{sign} {bound}")
        if (pattern := getattr(item, "pattern", None)) is not None:
            parts.append(f"matching {pattern}")
    return (" " + ", ".join(parts)) if parts else ""


def type_text(annotation: object, metadata: typing.Iterable[object] = ()) -> str:
    """A person's reading of a field's type: ``int > 0``, ``dense | ring``, ``list[int > 0]``, ``str | null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner_metadata = [
            m for extra in args[1:] for m in (extra.metadata if isinstance(extra, FieldInfo) else [extra])
        ]
        return type_text(args[0], [*inner_metadata, *metadata])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if not isinstance(a, str) else a for a in args) + _bounds(metadata)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin is list:
        return f"list[{type_text(args[0])}]"
    name = getattr(annotation, "__name__", str(annotation))
    return name + _bounds(metadata)


def default_text(field: FieldInfo) -> str:
    """The default as an override or YAML would write it; ``required`` where there is none."""
    if field.is_required():
        return REQUIRED
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, str):
        return value
    return json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)


def config_reference(schema: type[BaseModel] = Config) -> list[ConfigKey]:
    """Every leaf key of ``schema``, in the schema's order, with its type, default and meaning.

    Raises ValueError naming the keys whose field has no ``description``: the schema must say
    what each key means.
    """
    rows = [
        ConfigKey(key, type_text(field.annotation, field.metadata), default_text(field), field.description or "")
        for key, field in _leaf_fields(schema)
    ]
    if missing := [row.key for row in rows if not row.meaning]:
        raise ValueError(f"config keys without a description in the schema: {', '.join(missing)}")
    return rows


def format_config_help(schema: type[BaseModel] = Config) -> str:
    """One line a key: ``key  type  default  meaning`` in columns, under a header on how to set them."""
    rows = config_reference(schema)
    header = ConfigKey("key", "type", "default", "meaning")
    widths = [min(max(len(getattr(r, column)) for r in [header, *rows]), cap) for column, cap in _COLUMNS]

    def line(row: ConfigKey) -> str:
        cells = [getattr(row, column).ljust(width) for (column, _), width in zip(_COLUMNS, widths, strict=True)]
        return "  ".join([*cells, row.meaning])

    lines = [
        "Config keys: a YAML file's nesting, or key=value overrides on the command line (model.d_model=256;",
        "a leaf name alone, lr=1e-3, sets the one key that ends in it).",
        "",
        line(header),
    ]
    return "\n".join(lines + [line(r) for r in rows])


_COLUMNS = (("key", 40), ("type", 30), ("default", 16))  # the columns padded, at most this wide


def section_summaries(schema: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Each section's dotted name -> the first line of its class docstring ("" for the top level)."""
    summaries = {prefix.rstrip("."): (inspect.getdoc(schema) or "").split("\n")[0]}
    for name, field in schema.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            summaries |= section_summaries(field.annotation, f"{prefix}{name}.")
    return summaries


def config_reference_markdown(schema: type[BaseModel] = Config) -> str:
    """The keys as Markdown: one table per section (a key's section: its name less the last part),
    headed by the section's summary."""
    rows, lines = config_reference(schema), []
    for section, summary in section_summaries(schema).items():
        lines += [f"## `{section}`" if section else "## Top level", "", summary, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for row in (r for r in rows if r.key.rpartition(".")[0] == section):
            cells = [_code(row.key), _code(row.type), _code(row.default), _cell(row.meaning)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: HTML-escaped, a ``|`` as an entity (it would split the cell)."""
    return html.escape(text).replace("|", "&#124;")


def _code(text: str) -> str:
    """Inline code for a Markdown table cell (a ``|`` inside backticks would still split the cell)."""
    return "<code>" + _cell(text) + "</code>"
