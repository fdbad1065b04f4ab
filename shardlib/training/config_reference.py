"""Every key of a run's config, from the schema: its dotted name, type, default and meaning.

``config_reference()`` walks the pydantic models of ``shardlib.training.config_schema`` (the ``model:``
section is ``shardlib.models.config.ModelConfig``) and returns one ``ConfigKey`` per leaf; the
docs' config reference page (``docs/hooks.py``) and any command that prints the keys read it.
A key's meaning is its field's ``description`` when the schema sets one, else the comment on the
field's line or the comment lines right above it in the schema's source.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import io
import tokenize
import types
import typing
from functools import cache

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from shardlib.training.config_schema import Config


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of the config: ``key`` dotted (``optimizer.lr``), ``type`` and ``default`` as text."""

    key: str
    type: str
    default: str  # "required" when the schema has no default
    description: str
    section: str  # the dotted section it belongs to ("" for the top level)


def config_reference(model: type[BaseModel] = Config, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of ``model`` in schema order; a nested section's keys follow its parent's leaves."""
    leaves, sections = [], []
    comments = _field_comments(model)
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sections.append((name, field.annotation))
            continue
        description = field.description or comments.get(name, "")
        default = _default_text(field)
        leaves.append(
            ConfigKey(
                prefix + name, _type_text(field.annotation, field.metadata), default, description, prefix.rstrip(".")
            )
        )
    for name, section in sections:
        leaves += config_reference(section, f"{prefix}{name}.")
    return leaves


def section_summaries(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Each section's dotted name -> the first line of its class docstring ("" for the top level)."""
    summaries = {prefix.rstrip("."): (inspect.getdoc(model) or "").split("\n")[0]}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            summaries |= section_summaries(field.annotation, f"{prefix}{name}.")
    return summaries


def config_reference_markdown() -> str:
    """The keys as Markdown: one table per section, headed by the section's summary."""
    keys, summaries = config_reference(), section_summaries()
    lines = []
    for section, summary in summaries.items():
        lines += [f"## `{section}`" if section else "## Top level", "", summary, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in (k for k in keys if k.section == section):
            cells = [_code(k.key), _code(k.type), _code(k.default), html.escape(k.description).replace("|", "&#124;")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _code(text: str) -> str:
    """Inline code for a Markdown table cell (a ``|`` inside backticks would still split the cell)."""
    return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"


def _default_text(field) -> str:
    if field.default_factory is not None:
        return repr(field.default_factory())
    return "required" if field.default is PydanticUndefined else repr(field.default)


_BOUNDS = {annotated_types.Gt: ">", annotated_types.Ge: ">=", annotated_types.Lt: "<", annotated_types.Le: "<="}


def _type_text(annotation, metadata=()) -> str:
    """``int > 0``, ``"a" | "b"``, ``float >= 0, < 1 | None``, ``list[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0], args[1:])
    if origin is typing.Literal:
        text = " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " | ".join("None" if a is type(None) else _type_text(a) for a in args)
    elif origin is list:
        text = f"list[{_type_text(args[0])}]"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = [
        f"{sign} {getattr(m, kind.__name__.lower())}"
        for m in _constraints(metadata)
        for kind, sign in _BOUNDS.items()
        if isinstance(m, kind)
    ]
    return f"{text} {', '.join(bounds)}" if bounds else text


def _constraints(metadata):
    """annotated_types bounds, also those inside a ``Field(...)`` (its own ``metadata``)."""
    for m in metadata:
        yield from getattr(m, "metadata", [m])


@cache
def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on its line, else the comment lines right above it, from the source."""
    source, _ = inspect.getsourcelines(model)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(source)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    found = {}
    for number, line in enumerate(source, start=1):
        name = line.strip().split(":")[0]
        if name not in model.model_fields or not line.startswith("    ") or line.startswith("     "):
            continue
        if number in comments:
            found[name] = comments[number]
            continue
        above, i = [], number - 1
        while i in comments and source[i - 1].strip().startswith("#"):
            above.insert(0, comments[i])
            i -= 1
        if above:
            found[name] = " ".join(above)
    return found
