"""A project's logical names onto a rule table's: ``kv -> head_dim``, ``joined_kv -> heads x head_dim``.

Other codebases name dimensions their own way (T5X and MaxText: ``kv`` for
the head dimension, ``joined_kv`` for heads and head dimension fused into one,
``norm``, ``activation_batch``...). Rather than re-annotating a model,
``alias_logical_axes`` adds rules for those names, derived from the rules of
the names they stand for:

* ``{"kv": "head_dim"}``: ``kv`` is resolved exactly as ``head_dim``
  (every rule for ``head_dim``, fallbacks included, in table order);
* ``{"joined_kv": ("heads", "head_dim")}``: one dimension that is the parts
  laid out row-major, the first part outermost, is split over the parts'
  mesh axes together, in order: with ``heads -> model`` and ``head_dim ->
  None`` it goes over ``model``, as ``heads`` would. Every combination of the
  parts' rules is a rule, first part's choices outermost, so fallbacks still
  apply. The dimension's size must divide by the product of those axes.

Mesh axis names are the other half: ``preset_rules(name, mesh=mesh,
mesh_axes={"data": "fsdp", "model": "tp"})`` and ``rules.rename_mesh_axes``.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping, Sequence

from shardlib.core.rules import Rule, Rules, ShardingError, axes_tuple

LogicalAliases = Mapping[str, str | Sequence[str]]


def _rules_for(rules: Rules, name: str) -> list[tuple[str, ...]]:
    return [axes_tuple(axes) for rule_name, axes in rules if rule_name == name]


def alias_logical_axes(rules: Rules, aliases: LogicalAliases) -> Rules:
    """The table with rules added for a project's logical names.

    Args:
      rules: the ordered rule table (``preset_rules(...)`` or your own).
      aliases: project name -> the table's name it stands for, or a tuple of
        names for one dimension that joins them (module docstring).
    Returns:
      ``rules`` followed by the aliases' rules; resolution of the table's own
      names is unchanged.
    Raises:
      ShardingError: an alias that already has rules, or one standing for a
        name the table has no rule for (with close matches).
    """
    known = list(dict.fromkeys(name for name, _ in rules))
    added: list[Rule] = []
    for alias, target in aliases.items():
        if alias in known:
            raise ShardingError(
                f"alias {alias!r} already has rules in the table; an alias only names a new logical axis"
            )
        parts = (target,) if isinstance(target, str) else tuple(target) if isinstance(target, tuple | list) else ()
        if not parts or not all(isinstance(p, str) for p in parts):
            raise ShardingError(f"alias {alias!r} stands for {target!r}; expected a logical name or a tuple of them")
        for part in parts:
            if part not in known:
                close = difflib.get_close_matches(part, known, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ShardingError(
                    f"alias {alias!r} stands for {part!r}, which has no rule.{hint} Known logical axes: "
                    f"{', '.join(sorted(known))}"
                )
        combined: list[tuple[str, ...]] = []
        for choice in itertools.product(*(_rules_for(rules, part) for part in parts)):
            # A mesh axis splits a dimension once; the first part that names it keeps it.
            axes = tuple(dict.fromkeys(axis for part_axes in choice for axis in part_axes))
            if axes not in combined:
                combined.append(axes)
        for axes in combined:
            added.append((alias, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules) + tuple(added)
