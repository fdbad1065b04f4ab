"""Two runs' training losses step by step: do a change's losses match the current code's within bf16 noise?

    python bench/compare_losses.py current/metrics.jsonl changed/metrics.jsonl [--tolerance 0.01]

Reads each run's ``metrics.jsonl`` (``train.py`` with ``log_every=1`` logs
every step), takes the steps both logged, and prints the largest difference
relative to the first run's loss, where it happens, and the mean over the
steps. The tolerance is relative: bf16 operands put a single matmul's
relative error between 1e-3 and 1e-2, and a change of kernels (cuDNN
attention, a chunked loss) changes the rounding of every step, so two
correct runs drift apart by about that much; 1e-2 by default. Exit 1 when
some step differs by more, 2 when the files share no step.
"""

from __future__ import annotations

import argparse
import sys

from shardlib.training.metrics import loss_by_step, read_metrics


def train_losses(path: str) -> dict[int, float]:
    """Step -> training loss of a run's metrics file (the later record wins for a repeated step)."""
    return dict(zip(*loss_by_step(read_metrics(path), "train"), strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="the current code's metrics.jsonl")
    parser.add_argument("changed", help="the changed run's metrics.jsonl")
    parser.add_argument("--tolerance", type=float, default=1e-2, help="largest relative difference allowed")
    args = parser.parse_args(argv)
    try:
        reference, changed = train_losses(args.reference), train_losses(args.changed)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    steps = sorted(reference.keys() & changed.keys())
    if not steps:
        print(f"error: {args.reference} and {args.changed} log no common training step", file=sys.stderr)
        return 2
    relative = {s: abs(changed[s] - reference[s]) / abs(reference[s]) for s in steps}
    worst = max(steps, key=relative.get)
    verdict = "within" if relative[worst] <= args.tolerance else "OVER"
    print(
        f"losses over {len(steps)} common steps ({steps[0]}..{steps[-1]}): largest relative difference "
        f"{relative[worst]:.2e} at step {worst} ({reference[worst]:.4f} vs {changed[worst]:.4f}), "
        f"mean {sum(relative.values()) / len(steps):.2e}; {verdict} the tolerance {args.tolerance:g}; "
        f"last {reference[steps[-1]]:.4f} vs {changed[steps[-1]]:.4f}"
    )
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
