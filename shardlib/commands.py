"""The ``shardlib`` command: one entry point whose subcommands run the project's own command modules.

    shardlib train --config configs/tiny.yaml --mesh meshes/cpu-8.yaml steps=50
    shardlib plan --config configs/1b.yaml --devices 64 --hardware h100
    shardlib check runs/tiny

Each subcommand hands the rest of the command line, untouched, to the ``main(argv)`` of the module
that has always run it (``shardlib plan`` is ``python -m shardlib.analysis.planner``): that module's
parser is the only one for its options, so ``shardlib CMD --help`` lists them, and this module adds
only where the documentation is. The modules are imported when their command runs, so that
``shardlib --help`` starts no JAX backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Sequence

DOCS = "docs/index.md"  # the docs site's front page (make docs builds it; mkdocs serve shows it)
EXIT_USAGE = 2  # argparse's status for a usage error


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: the module whose ``main(argv) -> int`` runs it, a summary and its docs page."""

    module: str
    summary: str
    docs: str  # the docs page that explains it, from the repository root
    function: str = "main"

    def main(self):
        return getattr(importlib.import_module(self.module), self.function)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "shardlib.training.cli", "train a transformer (python train.py)", "docs/getting-started.md", "train_main"
    ),
    "describe": Command(
        "shardlib.analysis.describe",
        "where every parameter lives under a config's rules and mesh",
        "docs/strategies/rules.md",
    ),
    "report": Command(
        "shardlib.analysis.report.__main__",
        "what a step costs: communication per mesh axis, memory, FLOPs, time",
        "docs/report.md",
    ),
    "plan": Command(
        "shardlib.analysis.planner",
        "which mesh and preset to train a config on N devices with",
        "docs/report.md",
    ),
    "launch": Command(
        "shardlib.cluster.launch", "run a command as N processes of one jax.distributed run", "docs/multihost.md"
    ),
    "export": Command(
        "shardlib.training.hf_export",
        "export a run's newest checkpoint as a Hugging Face checkpoint",
        "docs/huggingface.md",
    ),
    "check": Command(
        "shardlib.training.run_check",
        "check a run directory's checkpoints and config record offline",
        "docs/checkpoints.md",
    ),
}


def docs_line(name: str) -> str:
    """Where ``shardlib NAME`` is documented, and the older command that runs the same."""
    command = COMMANDS[name]
    same = "python train.py" if name == "train" else f"python -m {command.module.removesuffix('.__main__')}"
    return f"docs: {command.docs} (shardlib {name} is {same})"


def usage() -> str:
    """``shardlib --help``: every subcommand with its summary."""
    width = max(map(len, COMMANDS))
    lines = ["usage: shardlib COMMAND [ARGS ...]   (shardlib COMMAND --help lists a command's options)", ""]
    lines += [f"  {name.ljust(width)}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"docs: {DOCS}; the config keys: shardlib train --help-config"]
    return "\n".join(lines)


def _asks_for_help(argv: Sequence[str]) -> bool:
    """Whether argparse will print the help: -h or --help before any ``--``."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def run(name: str, argv: Sequence[str]) -> int:
    """Runs subcommand ``name`` on ``argv`` (its own arguments); its exit status.

    A module that exits (argparse's ``--help`` and usage errors) gives its status as a return value.
    After the module's own ``--help``, says where the command is documented.
    """
    main = COMMANDS[name].main()
    program, sys.argv[0] = sys.argv[0], f"shardlib {name}"  # the usage line of a parser without its own prog
    try:
        status = main(list(argv))
    except SystemExit as exit:
        status = exit.code
    finally:
        sys.argv[0] = program
    if _asks_for_help(argv):
        print(f"\n{docs_line(name)}")
    return 0 if status is None else status


def main(argv: Sequence[str] | None = None) -> int:
    """``shardlib COMMAND [ARGS ...]``: the console entry point (``[project.scripts]`` in pyproject.toml)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\nerror: unknown command {name!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    return run(name, rest)
