"""Reading the project's YAML files (configs, meshes) with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """The parsed content of ``path``; ``error`` naming ``what`` and the path if unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"invalid YAML in {what} {path}: {err}") from None
