"""Side by side: several ``bench/throughput.py --json`` results, each against the first.

    python bench/throughput_table.py base.json fused.json ... [--markdown]

One row per file (named by its file name): tokens/s and its ratio to the
first file's, MFU, step time dispatched ahead, host time per step, compile
time, the memory the step held, and, where the run was traced, the step's
percent by op category (``shardlib.analysis.step_profile``). Two commits'
JSONs compare the same way. A ratio between runs made at different times
on one machine carries that machine's drift: for a decision, rerun the two
alternately (``farm-bench``) or read the step profile's milliseconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

CATEGORY_COLUMNS = ("matmul", "attention", "elementwise", "copy", "collective", "idle")


def row(path: pathlib.Path, base_tokens_per_s: float) -> list[str]:
    r = json.loads(path.read_text())
    memory = r.get("memory") or {}
    held = memory.get("peak_in_use") or sum(memory.get(k) or 0 for k in ("arguments", "temporaries"))
    percent = (r.get("profile") or {}).get("percent") or {}
    cells = [
        path.stem,
        f"{r['tokens_per_s']:,.0f}",
        f"{r['tokens_per_s'] / base_tokens_per_s:.3f}",
        f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
        f"{r['step_ms']:.1f}",
        f"{r['host_ms']:.2f}",
        f"{r['compile_s']:.0f}",
        f"{held / 2**30:.1f}" if held else "-",
    ]
    return cells + [f"{percent[c]:.0f}" if c in percent else "-" for c in CATEGORY_COLUMNS]


def table(paths: list[pathlib.Path], markdown: bool = False) -> str:
    """The rows of ``paths``, with a header naming the first file's device and JAX."""
    first = json.loads(paths[0].read_text())
    header = ["run", "tokens/s", "x first", "MFU", "step ms", "host ms", "compile s", "GiB"]
    header += [f"{c} %" for c in CATEGORY_COLUMNS]
    rows = [header] + [row(p, first["tokens_per_s"]) for p in paths]
    title = f"{first['device']} x {first['devices']}, jax {first['jax']}, peak {first.get('peak_tflops')} TFLOPS"
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "---|" * len(header))
        return title + "\n\n" + "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return title + "\n" + "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="bench/throughput.py --json outputs; the first is the base")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    args = parser.parse_args(argv)
    paths = [pathlib.Path(p) for p in args.json]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(table(paths, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
