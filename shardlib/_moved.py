"""Pointers where modules used to be: ``python -m shardlib.plan`` says where the planner went.

Each old path is a module of two lines that calls ``moved``. Run (``python -m``), it prints one
``error:`` line with the command to run now, its arguments included, and exits 2 without running
anything; imported, it raises ImportError naming the new module.
"""

from __future__ import annotations

import shlex
import sys

MOVED: dict[str, str] = {
    "shardlib.describe": "shardlib.analysis.describe",
    "shardlib.plan": "shardlib.analysis.planner",
    "shardlib.report": "shardlib.analysis.report",
    "shardlib.launch": "shardlib.cluster.launch",
}
EXIT_MOVED = 2  # a usage error: the command was not run


def moved(old: str, run: bool) -> None:
    """Says where module ``old`` went: exits ``EXIT_MOVED`` when ``run`` as a command, else raises ImportError."""
    new = MOVED[old]
    if not run:
        raise ImportError(f"{old} moved to {new}; import it from there")
    command = shlex.join(["python", "-m", new, *sys.argv[1:]])
    print(f"error: python -m {old} moved to python -m {new}; run: {command}", file=sys.stderr)
    raise SystemExit(EXIT_MOVED)
