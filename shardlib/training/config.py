"""Training configuration: YAML loading, ``key=value`` overrides and error messages.

A run is described by one YAML file (see ``configs/``) plus optional command-line
overrides such as ``steps=50`` or ``optimizer.lr=1e-3``. Pydantic does the type
checking (the schema is :mod:`shardlib.training.config_schema` with the model's own
:mod:`shardlib.models.config`, both re-exported here) so
that every mistake surfaces as a :class:`ConfigError` naming the offending key, the
value given and what was expected, before any device work starts.
"""

import copy
import difflib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from shardlib.core.yaml_file import read_yaml
from shardlib.models.config import ModelConfig, MoEConfig
from shardlib.training.config_schema import (
    CONDITIONAL_SECTIONS,
    WORD_SENSES,
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    FaultsConfig,
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
    "check_short_names",
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


def _word_senses(model_cls: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    """``WORD_SENSES`` whose keys are all in ``model_cls`` (another schema has none of them)."""
    keys = set(config_keys(model_cls))
    return {word: senses for word, senses in WORD_SENSES.items() if keys.issuperset(senses)}


def _by_leaf(keys: Sequence[str]) -> dict[str, list[str]]:
    by_leaf: dict[str, list[str]] = {}
    for dotted in keys:
        by_leaf.setdefault(dotted.rpartition(".")[2], []).append(dotted)
    return by_leaf


def _close_keys(key: str, model_cls: type[BaseModel], *, sections: bool = False) -> list[str]:
    """The keys a mistyped ``key`` may have meant: close dotted keys and unique leaf names, and every key
    a word of ``WORD_SENSES`` close to ``key`` (or to its last part) stands for. ``sections``: section
    names too (a config file's mistyped ``optimiser:``)."""
    keys = config_keys(model_cls)
    senses = _word_senses(model_cls)
    unique = [leaf for leaf, found in _by_leaf(keys).items() if len(found) == 1 and leaf not in keys + list(senses)]
    names = keys + unique + list(senses) + (list(model_cls.model_fields) if sections else [])
    words = difflib.get_close_matches(key.rpartition(".")[2], list(senses), n=1)
    words += difflib.get_close_matches(key, names, n=3)
    return list(dict.fromkeys(k for word in words for k in senses.get(word, (word,))))


def _resolve_key(key: str, model_cls: type[BaseModel]) -> tuple[str, FieldInfo]:
    """Map a full dotted key or a unique leaf name to its dotted key and field."""
    fields = dict(_leaf_fields(model_cls))
    if key in fields:
        return key, fields[key]
    candidates = _word_senses(model_cls).get(key) or _by_leaf(list(fields)).get(key, [])
    if len(candidates) == 1:
        return candidates[0], fields[candidates[0]]
    if candidates:
        raise ConfigError(f"ambiguous config key '{key}'; use the full name: {', '.join(candidates)}")
    close = _close_keys(key, model_cls)
    hint = f"did you mean: {', '.join(close)}?" if close else f"valid keys: {', '.join(fields)}"
    raise ConfigError(f"unknown config key '{key}'; {hint}")


def check_short_names(cfg: Config, overrides: Sequence[str]) -> None:
    """Raises ConfigError for an override by leaf name (``nesterov=false``) whose key is in a section
    ``cfg`` never reads (``CONDITIONAL_SECTIONS``: ``outer`` without DiLoCo, ``model.moe`` without
    experts): it would be set and change nothing. The full name (``outer.nesterov=false``) is taken
    as meant, and so is a leaf name in a section the same overrides (or the file) turn on."""
    for override in overrides:
        key, _, raw = override.partition("=")
        key = key.strip()
        dotted, _ = _resolve_key(key, Config)
        section = next((s for s in CONDITIONAL_SECTIONS if dotted.startswith(s.prefix)), None)
        if dotted == key or section is None or dotted == section.switch or section.is_on(cfg):
            continue
        value = functools.reduce(getattr, section.switch.split("."), cfg)
        raise ConfigError(
            f"override '{override}' sets {dotted}, which this run never reads ({section.switch} is {value!r}); "
            f"set {section.how} to use it, or write the full name {dotted}={raw.strip()} to set it while it is off"
        )


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
    the schema (``lr``), unless it is a word for settings of two sections (``WORD_SENSES``:
    ``learning_rate``, ``compression``, ``momentum``), an error naming them; ``load_config``
    also refuses a leaf name in a section the run never reads (``check_short_names``).
    Values are parsed with ``yaml.safe_load`` so ``true``, ``[a, b]`` and ``null``
    work; type checking is left to pydantic, whose lax mode
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
        close = _close_keys(key, model_cls, sections=True)
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
    cfg = validate_config(apply_overrides(raw, overrides), source)
    check_short_names(cfg, overrides)
    return cfg


def config_to_dict(cfg: BaseModel) -> dict:
    """Plain JSON-able dict of a config, e.g. for saving next to a run."""
    return cfg.model_dump(mode="json")
