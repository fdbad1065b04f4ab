"""The layers, proven from the source: who imports whom, what the distribution installs, no shadowing.

The layers are ``shardlib/core`` (rules) < ``shardlib/parallel`` (strategies) < ``shardlib/models``
(the model zoo) < ``shardlib/training`` < ``shardlib/cluster`` / ``shardlib/analysis``, with
``shardlib/interop`` (Hugging Face conversion) on the core and the models, below training. Every
import statement of every file, at any depth (inside functions, under ``TYPE_CHECKING``), is read
with ``ast``; nothing is imported to find them. One subprocess then imports the strategies from a
user's project that has its own ``models`` package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "shardlib"


def module_name(path: Path) -> str:
    """``shardlib/parallel/attention.py`` -> ``shardlib.parallel.attention`` (a package's ``__init__`` is it)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    """True when ``dotted`` is a module or package of this checkout (``shardlib.x.y``)."""
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the module ``module`` (a package or not).

    ``from a.b import c`` yields ``a.b``, and ``a.b.c`` too when that is a module of this checkout
    (``from shardlib.parallel import compat``). Relative imports are resolved against ``module``.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if _is_module(f"{target}.{a.name}")]
    return found


def package_imports(directory: Path) -> list[tuple[str, int, str]]:
    """(file relative to the repository, line, imported module) for every import under ``directory``."""
    result = []
    for path in sorted(directory.rglob("*.py")):
        name = module_name(path)
        for line, imported in imports_of(path.read_text(), name, path.name == "__init__.py"):
            result.append((str(path.relative_to(REPO)), line, imported))
    return result


def offending(directory: Path, allowed=None, forbidden: tuple[str, ...] = ()) -> list[str]:
    """``file:line imports module`` for each import of shardlib under ``directory`` it may not make.

    ``forbidden``: packages (with their submodules) it must not import; ``allowed``: when given, the
    only shardlib packages it may import.
    """

    def within(name: str, packages) -> bool:
        return any(name == p or name.startswith(p + ".") for p in packages)

    bad = []
    for file, line, imported in package_imports(directory):
        if not within(imported, ("shardlib",)):
            continue
        if within(imported, forbidden) or (allowed is not None and not within(imported, allowed)):
            bad.append(f"{file}:{line} imports {imported}")
    return bad


ABOVE_PARALLEL = ("shardlib.models", "shardlib.training", "shardlib.interop", "shardlib.analysis", "shardlib.cluster")


def test_the_import_reader_resolves_relative_nested_and_submodule_imports():
    source = textwrap.dedent(
        """
        import jax.numpy as jnp
        from . import rules
        from .. import parallel
        from ..parallel import compat

        def late():
            from shardlib.training.config import Config
        """
    )
    assert imports_of(source, "shardlib.core.mesh", is_package=False) == [
        (2, "jax.numpy"),
        (3, "shardlib.core"),
        (3, "shardlib.core.rules"),
        (4, "shardlib"),
        (4, "shardlib.parallel"),
        (5, "shardlib.parallel"),
        (5, "shardlib.parallel.compat"),
        (8, "shardlib.training.config"),
    ]
    assert imports_of("from . import flax_axes", "shardlib.core", is_package=True) == [
        (1, "shardlib.core"),
        (1, "shardlib.core.flax_axes"),
    ]


def test_core_imports_nothing_else_of_shardlib():
    bad = offending(PACKAGE / "core", allowed=("shardlib.core",))
    assert not bad, "shardlib/core (the rules) imports other parts of shardlib:\n" + "\n".join(bad)


def test_parallel_imports_no_layer_above_it():
    bad = offending(PACKAGE / "parallel", forbidden=ABOVE_PARALLEL)
    assert not bad, "shardlib/parallel (the strategies) imports layers above it:\n" + "\n".join(bad)


def test_models_import_no_training_interop_analysis_or_cluster():
    forbidden = ("shardlib.training", "shardlib.interop", "shardlib.analysis", "shardlib.cluster")
    bad = offending(PACKAGE / "models", forbidden=forbidden)
    assert not bad, "shardlib/models imports layers above it:\n" + "\n".join(bad)


def test_interop_and_training_do_not_import_each_other():
    """One direction only: interop converts on the core and the models; training uses it (init_from, export)."""
    up = offending(PACKAGE / "interop", allowed=("shardlib.core", "shardlib.models", "shardlib.interop"))
    assert not up, "shardlib/interop imports more than shardlib.core and shardlib.models:\n" + "\n".join(up)
    down = offending(PACKAGE / "training", forbidden=("shardlib.interop",))
    assert down, "training no longer imports interop: update this test's docstring and the layer table"
    for above in ("analysis", "cluster"):
        bad = offending(PACKAGE / "interop", forbidden=(f"shardlib.{above}",))
        assert not bad, "\n".join(bad)


def test_every_import_is_shardlib_the_standard_library_or_an_installed_distribution():
    """No import of a top-level ``models`` (or any other package of the repository outside ``shardlib``)."""
    third_party = {
        top
        for top, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower() != "shardlib" for d in dists)  # shardlib's own install may list an old `models`
    }
    known = {"shardlib", "__future__", *sys.stdlib_module_names, *third_party}
    bad = [
        f"{file}:{line} imports {imported}"
        for file, line, imported in package_imports(PACKAGE)
        if imported.split(".")[0] not in known or imported.split(".")[0] == "models"
    ]
    assert not bad, "shardlib imports modules outside its namespace and the installed distributions:\n" + "\n".join(bad)


def test_the_distribution_installs_only_shardlib_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    assert "packages" not in setup or set(setup["packages"]) == {"find"}, setup.get("packages")
    assert "py-modules" not in setup, setup["py-modules"]
    find = setup["packages"]["find"]
    assert find["include"] == ["shardlib*"], find
    found = setuptools.find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert found and all(p == "shardlib" or p.startswith("shardlib.") for p in found), found


USER_PROJECT_CHECK = """
import sys
from jax._src import xla_bridge

import shardlib

assert shardlib.__file__.startswith({repo!r}), shardlib.__file__
assert not xla_bridge.backends_are_initialized(), "import shardlib started a JAX backend"
assert set(shardlib.__all__) <= set(dir(shardlib)), set(shardlib.__all__) - set(dir(shardlib))
from shardlib import *  # the strategies too (shardlib.STRATEGIES, imported on first use)

assert not xla_bridge.backends_are_initialized(), "importing the strategies started a JAX backend"
import shardlib.parallel.attention, shardlib.parallel.experts, shardlib.parallel.pipeline.executor
import shardlib.parallel.reduction
assert "models" not in sys.modules, sys.modules["models"]
import models.layers  # the user's own package is still theirs

assert models.layers.OWNER == "the user", models.layers.__file__
print("ok")
"""


def test_a_users_models_package_is_not_shadowed_and_import_starts_no_backend(tmp_path):
    """A project with its own ``models/layers.py`` imports shardlib's strategies and keeps its package."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "layers.py").write_text('OWNER = "the user"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", USER_PROJECT_CHECK.format(repo=str(PACKAGE))],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("layer", ["core", "parallel", "models", "interop", "training", "analysis", "cluster"])
def test_each_layer_is_read(layer):
    """The checks above see every layer's files (an empty read would prove nothing)."""
    assert any(file.startswith(f"shardlib/{layer}/") for file, _, _ in package_imports(PACKAGE / layer))
