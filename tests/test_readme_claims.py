"""The docs' "How strategies compose" (docs/strategies/index.md, the README's section until issue 30)
held to the code, so that it cannot drift (issue 26).

Its compatibility matrix is what ``python -m shardlib.analysis.describe --compat`` prints, its
sample plan what ``describe`` prints for the command it names, its counts of runs are the covers
tests/test_compat.py and tests/test_multiprocess_cells.py run, and its tolerances are theirs.
No step is compiled here.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from shardlib.analysis import describe
from tests.test_compat import BF16_TIMES, COMBOS, WRONG_BY
from tests.test_multiprocess_cells import MP_COMBOS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "strategies" / "index.md"
SECTION = "How strategies compose"


def _section(title: str) -> str:
    """The docs page whose ``# title...`` heading is ``title``, whole."""
    text = PAGE.read_text()
    assert f"\n# {title}" in text, f"{PAGE.relative_to(ROOT)} is no longer the page {title!r}"
    return text


def _prose(title: str) -> str:
    """The section with every run of whitespace one space, so that a phrase reads across line breaks."""
    return " ".join(_section(title).split())


def _code_block(section: str, first_line: str) -> str:
    """The fenced block of ``section`` that starts with ``first_line``."""
    blocks = re.findall(r"^```\n(.*?)\n```$", section, re.DOTALL | re.MULTILINE)
    matching = [b for b in blocks if b.startswith(first_line)]
    assert len(matching) == 1, f"{len(matching)} blocks of {SECTION!r} start with {first_line!r}"
    return matching[0]


def _printed(capsys, argv: list[str]) -> str:
    assert describe.main(argv) == 0
    return capsys.readouterr().out


def test_the_readmes_matrix_is_what_describe_compat_prints(capsys):
    matrix = _printed(capsys, ["--compat"]).split("\n\n")[0]  # title, header and one row per feature
    assert _code_block(_section(SECTION), "feature compatibility") == matrix


def test_the_readmes_sample_plan_is_what_describe_prints(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the command's paths are the checkout's
    section = _section(SECTION)
    command = re.search(r"`python -m shardlib\.analysis\.describe (--config [^`]*)`", section)
    assert command, f"{SECTION!r} names no describe command for its sample plan"
    printed = _printed(capsys, command.group(1).split())
    plan = printed[printed.index("parallel plan:") :].rstrip("\n")
    assert _code_block(section, "parallel plan:") == plan


@pytest.mark.parametrize(
    ("phrase", "count"),
    [
        (r"in (\d+) feature combinations chosen by a least-cost", len(COMBOS)),
        (r"(\d+) combinations that between them turn on every feature beside `multiprocess`", len(MP_COMBOS)),
    ],
    ids=["test_compat", "test_multiprocess_cells"],
)
def test_the_readmes_counts_are_the_runs(phrase, count):
    found = re.search(phrase, _prose(SECTION))
    assert found, f"{SECTION!r} no longer says {phrase!r}"
    assert int(found.group(1)) == count


def test_the_readmes_bf16_tolerance_is_the_cells():
    words = {2.0: "twice"}
    prose = _prose(SECTION)
    assert f"no further from it than {words[BF16_TIMES]} the one-device bf16 run is" in prose
    assert f"which gradients {WRONG_BY - 1:.0%} off fail" in prose
