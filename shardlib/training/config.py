"""Training configuration: YAML loading, ``key=value`` overrides and error messages.

A run is described by one YAML file (see ``configs/``) plus optional command-line
overrides such as ``steps=50`` or ``optimizer.lr=1e-3``. Pydantic does the type
checking (the schema is :mod:`shardlib.training.config_schema`, re-exported here) so
that every mistake surfaces as a :class:`ConfigError` naming the offending key, the
value given and what was expected, before any device work starts.
"""

import copy
import difflib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from shardlib.core.yaml_file import read_yaml
from shardlib.training.config_schema import (
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    FaultsConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    PipelineConfig,
)

__all__ = [
    "AttentionConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FaultsConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "apply_overrides",
    "config_keys",
    "config_to_dict",
    "load_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A config file or override is unusable; the message says what to fix."""


def _leaf_fields(model_cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Yield ``(dotted key, field)`` for every non-model field, depth first."""
    for name, field in model_cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def config_keys(model_cls: type[BaseModel] = Config) -> list[str]:
    """All dotted leaf keys of the schema, e.g. ``steps``, ``model.d_model``, ``optimizer.lr``."""
    return [key for key, _ in _leaf_fields(model_cls)]


def _resolve_key(key: str, model_cls: type[BaseModel]) -> tuple[str, FieldInfo]:
    """Map a full dotted key or a unique leaf name to its dotted key and field."""
    fields = dict(_leaf_fields(model_cls))
    if key in fields:
        return key, fields[key]
    by_leaf: dict[str, list[str]] = {}
    for dotted in fields:
        by_leaf.setdefault(dotted.rpartition(".")[2], []).append(dotted)
    candidates = by_leaf.get(key, [])
    if len(candidates) == 1:
        return candidates[0], fields[candidates[0]]
    if candidates:
        raise ConfigError(f"ambiguous config key '{key}'; use the full name: {', '.join(candidates)}")
    unique_leaves = [leaf for leaf, keys in by_leaf.items() if len(keys) == 1 and leaf not in fields]
    close = difflib.get_close_matches(key, list(fields) + unique_leaves, n=3)
    hint = f"did you mean: {', '.join(close)}?" if close else f"valid keys: {', '.join(fields)}"
    raise ConfigError(f"unknown config key '{key}'; {hint}")


def _parse_value(override: str, raw: str, field: FieldInfo) -> Any:
    """Parse an override value as YAML, except where the field wants the text itself."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        detail = getattr(exc, "problem", None) or exc  # the one-line gist, not the mark dump
        raise ConfigError(f"cannot parse the value in override '{override}': {detail}") from None
    # YAML would turn run_dir=2024 into an int or run_dir=no into False, which a str
    # field then rejects; for plain string fields the text as typed is what was meant.
    if field.annotation is str and not isinstance(value, str):
        return raw.strip()
    return value


def apply_overrides(cfg_dict: dict, overrides: Sequence[str], model_cls: type[BaseModel] = Config) -> dict:
    """Return a copy of ``cfg_dict`` with ``key=value`` overrides applied, in order.

    A key is a full dotted path (``optimizer.lr``) or a leaf name that occurs once in
    the schema (``lr``). Values are parsed with ``yaml.safe_load`` so ``true``,
    ``[a, b]`` and ``null`` work; type checking is left to pydantic, whose lax mode
    also accepts the ``1e-3`` that YAML 1.1 reads as a string. ``model_cls`` selects
    the schema the keys are resolved against.
    """
    result = copy.deepcopy(cfg_dict)
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"malformed override '{override}': expected key=value, e.g. steps=200 or optimizer.lr=1e-3"
            )
        dotted, field = _resolve_key(key, model_cls)
        value = _parse_value(override, raw, field)
        *parents, leaf = dotted.split(".")
        node = result
        for depth, part in enumerate(parents):
            if node.get(part) is None:  # section absent, or written as an empty `part:`
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(f"cannot apply override '{override}': '{section}' is {node!r}, not a mapping")
        node[leaf] = value
    return result


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_error(error: dict, model_cls: type[BaseModel]) -> str:
    """One line per pydantic error: dotted key, what is wrong, and the value given."""
    key = ".".join(str(part) for part in error["loc"]) or "config"
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        known = dict.fromkeys(config_keys(model_cls) + list(model_cls.model_fields))
        close = difflib.get_close_matches(key, list(known), n=3)
        message = "unknown key" + (f"; did you mean: {', '.join(close)}?" if close else "")
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    line = f"{key}: {message}"
    # For "missing" and for whole-model checks the input is the enclosing mapping,
    # which is noise rather than the culprit.
    if kind != "missing" and not isinstance(error.get("input"), dict):
        line += f" (got {_short_repr(error['input'])})"
    return line


def validate_config(cfg_dict: dict, source: str = "", model_cls: type[BaseModel] = Config) -> BaseModel:
    """Validate a plain dict into ``model_cls``, turning pydantic errors into a ConfigError.

    ``source`` (e.g. ``"in configs/tiny.yaml"``) is put in the message header.
    """
    try:
        return model_cls.model_validate(cfg_dict)
    except ValidationError as exc:
        lines = [_describe_error(error, model_cls) for error in exc.errors()]
        header = f"invalid config {source}".rstrip()
        raise ConfigError(header + ":\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file, apply overrides and validate the result."""
    raw = read_yaml(path, "config file", ConfigError)
    if raw is None:  # an empty file; validation then reports what is missing
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"invalid config in {path}: the top level must be a mapping of keys, got {type(raw).__name__}"
        )
    source = f"in {path}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
    return validate_config(apply_overrides(raw, overrides), source)


def config_to_dict(cfg: BaseModel) -> dict:
    """Plain JSON-able dict of a config, e.g. for saving next to a run."""
    return cfg.model_dump(mode="json")
