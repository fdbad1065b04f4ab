"""``from shardlib import ...``: the rules core and the strategies (``shardlib.STRATEGIES``, imported on first use).

That ``import shardlib`` and every strategy name start no JAX backend is checked in a fresh process by
tests/test_layering.py (test_a_users_models_package_is_not_shadowed_and_import_starts_no_backend).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import shardlib


@pytest.mark.parametrize("name", sorted(shardlib.STRATEGIES))
def test_every_strategy_name_is_its_modules_own_and_exported(name):
    module = shardlib.STRATEGIES[name]
    assert module.startswith("shardlib.parallel."), f"{name}: {module} is not a strategy module"
    assert getattr(shardlib, name) is getattr(importlib.import_module(module), name)
    assert name in shardlib.__all__ and name in dir(shardlib)


def test_all_and_dir_name_the_same_public_objects():
    assert len(shardlib.__all__) == len(set(shardlib.__all__)), "a name is both in the rules core and a strategy"
    public = {n for n in dir(shardlib) if not n.startswith("_") and not inspect.ismodule(getattr(shardlib, n))}
    assert public == set(shardlib.__all__)
    for name in shardlib.__all__:  # what `from shardlib import *` takes: every name resolves
        getattr(shardlib, name)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'shardlib' has no attribute 'pipeline_los'"):
        shardlib.pipeline_los  # noqa: B018


def test_no_public_name_or_command_disappears():
    """``tests/public_api.txt`` records the public API: every ``shardlib.__all__`` name and console
    command. A name gone is a breaking change; a new name is added to the record with its change."""
    from shardlib import commands

    lines = (Path(__file__).parent / "public_api.txt").read_text().splitlines()
    recorded = {line for line in lines if line and not line.startswith("#")}
    now = set(shardlib.__all__) | {f"command {name}" for name in commands.COMMANDS}
    assert not recorded - now, f"public names gone (a breaking change): {sorted(recorded - now)}"
    assert not now - recorded, f"new public names: add them to tests/public_api.txt: {sorted(now - recorded)}"
