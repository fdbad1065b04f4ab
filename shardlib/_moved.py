"""Where modules used to be: ``python -m shardlib.plan`` still runs the planner, now ``shardlib plan``.

Each old path is a module of two lines that calls ``moved``. Run (``python -m``), it says on stderr
which command it is now and runs that command with the same arguments (``shardlib.commands``), so
older instructions keep working; imported, it raises ImportError naming the new module, since none
of the old modules' names live there any more.
"""

from __future__ import annotations

import sys

# Old module -> (the module it became, its ``shardlib`` command).
MOVED: dict[str, tuple[str, str]] = {
    "shardlib.describe": ("shardlib.analysis.describe", "describe"),
    "shardlib.plan": ("shardlib.analysis.planner", "plan"),
    "shardlib.report": ("shardlib.analysis.report", "report"),
    "shardlib.launch": ("shardlib.cluster.launch", "launch"),
}


def moved(old: str, run: bool) -> None:
    """Runs module ``old``'s command (exiting with its status) when ``run`` as a command, else raises ImportError."""
    new, command = MOVED[old]
    if not run:
        raise ImportError(f"{old} moved to {new}; import it from there")
    from shardlib.commands import run as run_command

    print(f"note: python -m {old} is now `shardlib {command}` (python -m {new}); running that", file=sys.stderr)
    raise SystemExit(run_command(command, sys.argv[1:]))
