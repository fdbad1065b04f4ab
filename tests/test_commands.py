"""The ``shardlib`` command: every subcommand runs its module's own main with the same arguments, says
where it is documented, and ``shardlib train --help-config`` lists every config key from the schema.

The console script exists only once the checkout is installed; these tests run its entry function
in-process, and ``python -m shardlib`` as a subprocess, which is the same function."""

import importlib
import pathlib
import re
import runpy
import subprocess
import sys
import tomllib

import pytest
from pydantic import BaseModel, Field

from shardlib import commands
from shardlib.analysis.planner import main as plan_main
from shardlib.training.cli import train_main
from shardlib.training.config import config_keys
from shardlib.training.config_help import config_reference, format_config_help

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# An option of each command's own parser: its --help lists it.
OWN_OPTION = {
    "train": "--stop-at",
    "describe": "--compat",
    "report": "--no-compile",
    "plan": "--verify",
    "launch": "--processes",
    "export": "--max-shard-size",
    "check": "--deep",
}


def test_the_console_script_in_pyproject_is_the_entry_function():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["shardlib"].split(":")
    assert getattr(importlib.import_module(module), function) is commands.main
    assert set(OWN_OPTION) == set(commands.COMMANDS)
    for name, command in commands.COMMANDS.items():
        assert callable(command.main()), name


@pytest.mark.parametrize("name", list(OWN_OPTION))
def test_each_command_help_lists_its_own_options_and_points_to_its_docs(name, capsys):
    assert commands.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and OWN_OPTION[name] in out, out
    assert out.rstrip().endswith(commands.docs_line(name))
    page = ROOT / commands.COMMANDS[name].docs
    assert page.is_file() and page.read_text().lstrip().startswith("<!--"), f"shardlib {name} points to {page}"


def test_a_command_runs_its_module_with_the_arguments_untouched(capsys):
    """``shardlib plan ...`` prints what ``python -m shardlib.analysis.planner ...`` prints, and exits the same."""
    argv = ["--config", TINY, "--devices", "8", "--presets", "dp", "--top", "1"]
    assert plan_main(argv) == 0
    direct = capsys.readouterr().out
    assert commands.main(["plan", *argv]) == 0
    assert capsys.readouterr().out == direct and "best:" in direct
    assert commands.main(["plan", "--config", TINY, "--devices", "0"]) == 2  # the module's own usage error
    assert "--devices is how many devices to plan for" in capsys.readouterr().err


def test_usage_and_an_unknown_command(capsys):
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^  {name} +\S", out, flags=re.MULTILINE) for name in commands.COMMANDS), out
    assert commands.main([]) == commands.EXIT_USAGE
    assert commands.main(["trian", "--config", TINY]) == commands.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error: unknown command 'trian'; the commands are train, describe, report, plan, launch" in err


def test_python_m_shardlib_is_the_command():
    proc = subprocess.run(
        [sys.executable, "-m", "shardlib", "check", "no/such/run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: no/such/run is not a run directory"), proc.stderr


@pytest.mark.parametrize(
    ("old", "command", "argv", "says"),
    [
        ("shardlib.plan", "plan", ["--config", TINY, "--devices", "8", "--presets", "dp", "--top", "1"], "best:"),
        ("shardlib.describe", "describe", ["--compat"], "1f1b"),
        ("shardlib.report", "report", ["--help"], "--no-compile"),
        ("shardlib.launch", "launch", ["--help"], "--processes"),
    ],
)
def test_a_former_module_path_runs_its_command(old, command, argv, says, monkeypatch, capsys):
    """Older instructions (``python -m shardlib.plan ...``) still run, saying what the command is now; the old
    modules hold no names, so importing one is an ImportError naming the new module."""
    from shardlib._moved import MOVED

    new = MOVED[old][0]
    monkeypatch.setattr("sys.argv", [old, *argv])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module(old, run_name="__main__")
    assert exit.value.code == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"note: python -m {old} is now `shardlib {command}` (python -m {new}); running that")
    assert says in captured.out
    with pytest.raises(ImportError, match=rf"^{old} moved to {new}; import it from there$"):
        importlib.import_module(old)


def test_the_readme_names_only_commands_that_exist():
    """In code (fenced blocks and inline spans): a line that starts with ``shardlib NAME``."""
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL) + re.findall(r"`([^`\n]+)`", text)
    named = {m for snippet in code for m in re.findall(r"^shardlib ([a-z]+)", snippet, flags=re.MULTILINE)}
    assert named, "the README shows no shardlib command"
    assert named <= set(commands.COMMANDS), f"README runs shardlib {named - set(commands.COMMANDS)}: no such command"


# --------------------------------------------------------------------------- --help-config


def test_help_config_lists_every_key_with_its_type_and_default(capsys):
    assert commands.main(["train", "--help-config"]) == 0  # without the --config train needs otherwise
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[4:]}
    assert list(rows) == config_keys(), "every key of the schema, in the schema's order, once"
    assert re.fullmatch(
        r"model\.moe\.top_k +int >= 1, <= 2 +2 +experts each token is routed to", rows["model.moe.top_k"]
    )
    assert re.fullmatch(r"model\.d_model +int > 0 +required +width of the residual stream", rows["model.d_model"])
    assert re.search(r"^faults\.spike_factor +float > 1 \| null +4\.0 +loss-spike guard", rows["faults.spike_factor"])
    assert re.search(
        r"^outer\.replica_axes +list\[data \| data_replica \| expert\] +\[\"data\"\] ", rows["outer.replica_axes"]
    )
    assert re.search(r"^init_from +str matching \^hf:\.\+ \| null +null +a fresh run", rows["init_from"])
    assert re.search(r"^data\.tokenizer +str \| null +null +text sources only", rows["data.tokenizer"])
    assert all(row.meaning for row in config_reference())
    with pytest.raises(SystemExit) as exit:  # python train.py --help-config: the same parser
        train_main(["--help-config"])
    assert exit.value.code == 0 and capsys.readouterr().out.splitlines() == lines


def test_help_config_refuses_a_key_without_a_description():
    class Section(BaseModel):
        said: int = Field(1, description="a key that says what it is")
        silent: int = 2

    class Schema(BaseModel):
        section: Section = Field(default_factory=Section, description="a section")

    with pytest.raises(ValueError, match=r"^config keys without a description in the schema: section\.silent$"):
        format_config_help(Schema)
