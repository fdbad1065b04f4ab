"""One version: pyproject.toml's, ``shardlib.__version__`` (the installed package's metadata) and
CHANGELOG.md's newest release agree, and it is a semantic version."""

from __future__ import annotations

import pathlib
import re
import tomllib

import shardlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_version_is_semantic_and_the_installed_one():
    version = _pyproject_version()
    assert SEMVER.match(version), f"pyproject.toml's version {version!r} is not a semantic version"
    assert shardlib.__version__ == version, (
        f"shardlib.__version__ is {shardlib.__version__!r} but pyproject.toml says {version!r}: reinstall "
        "the project (make test does when pyproject.toml changes)"
    )


def test_the_changelogs_newest_release_is_the_version():
    releases = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert releases and releases[0] == "Unreleased", "CHANGELOG.md must open with an [Unreleased] section"
    assert len(releases) > 1 and releases[1] == _pyproject_version(), (
        f"CHANGELOG.md's newest release is {releases[1:2]} but pyproject.toml's version is {_pyproject_version()!r}"
    )
