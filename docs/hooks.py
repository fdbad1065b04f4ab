"""MkDocs hooks: the pages whose body is generated at build time from the code.

A page holds a marker comment, replaced before Markdown is rendered:

* ``<!-- generated: config-reference -->``: every config key, from the schema
  (``shardlib.training.config_help.config_reference_markdown``);
* ``<!-- generated: public-api -->``: ``shardlib.__all__``, each name linked to its reference entry
  (a name whose entry is missing fails the strict build);
* ``<!-- generated: modules PACKAGE -->``: one mkdocstrings block per public module of PACKAGE.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- generated: ([\w-]+)(?: ([\w.]+))? -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: _generate(m.group(1), m.group(2)), markdown)


def _generate(kind: str, argument: str | None) -> str:
    if kind == "config-reference":
        from shardlib.training.config_help import config_reference_markdown

        return config_reference_markdown()
    if kind == "public-api":
        return _public_api()
    if kind == "modules":
        return _modules(argument)
    raise ValueError(f"docs/hooks.py: unknown marker 'generated: {kind}'")


def _modules(package: str) -> str:
    folder = ROOT.joinpath(*package.split("."))
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    return "\n\n".join(f"::: {package}.{name}" for name in names)


def _public_api() -> str:
    """A table of ``shardlib.__all__``: each name, where it lives, and the first line of its docstring."""
    import shardlib

    imported = _imported_from(ROOT / "shardlib" / "__init__.py")
    rows = ["| name | defined in | what it is |", "|---|---|---|"]
    for name in shardlib.__all__:
        module = shardlib.STRATEGIES.get(name) or imported.get(name, "shardlib")
        summary = _docstring(module, name).strip().split("\n")[0].replace("|", "\\|")
        rows.append(f"| [`{name}`][{module}.{name}] | `{module}` | {summary} |")
    return "\n".join(rows)


def _docstring(module: str, name: str) -> str:
    """The docstring of ``name`` in ``module``'s source: a def's or class's, or the string after an assignment."""
    tree = (
        ast.parse(ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text())
        if module != "shardlib"
        else (ast.parse((ROOT / "shardlib" / "__init__.py").read_text()))
    )
    body = tree.body
    for i, node in enumerate(body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_docstring(node) or ""
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and i + 1 < len(body):
            after = body[i + 1]
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return after.value.value
    return ""


def _imported_from(init: pathlib.Path) -> dict[str, str]:
    """Name -> module, for every ``from X import name`` of the package's ``__init__``."""
    tree = ast.parse(init.read_text())
    return {a.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names}
