"""``from shardlib import ...``: the rules core and the strategies (``shardlib.STRATEGIES``, imported on first use).

That ``import shardlib`` and every strategy name start no JAX backend is checked in a fresh process by
tests/test_layering.py (test_a_users_models_package_is_not_shadowed_and_import_starts_no_backend).
"""

from __future__ import annotations

import importlib
import inspect

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
