"""DiLoCo against data parallelism on one config: held-out loss curves, and the bytes every step moves.

    python bench/diloco.py [--config configs/tiny.yaml] [--mesh meshes/cpu-8.yaml] [--diloco 4,8,16]
                           [--out docs/diloco_loss.png] [--runs runs/bench-diloco] [key=value ...]

Trains the config as it is (data parallelism: the default run's steps, schedule
and batch), then DiLoCo over ``data`` (outer SGD with Nesterov momentum 0.9) for
each ``--diloco`` item, ``H`` or ``H@lr`` (the outer lr, default 0.7), or ``H@local``
(local SGD: outer SGD at lr 1 without momentum, i.e. averaging), any of them with
``+first`` or ``+both`` (``outer.average_moments``: AdamW's mu, or mu and nu, averaged
over the groups at every outer step), every run
from the same initial network on the same batches, and
evaluates all of them on the same held-out batches every ``eval_every`` steps
(24 here, a multiple of H = 4 and 8, and at the last step; 8 batches). DiLoCo's
held-out loss is that of the outer parameters (the anchor: the network the last
outer step made, ``anchor_step`` in its eval rows), plotted at that step. Writes
one PNG with every curve (training loss, smoothed, and held-out loss; the legend
below them) and prints a table: the final held-out loss, its ratio to
data parallelism's, and the wire bytes per device of the compiled programs
over ``data``: per synchronous step, per inner step (0: no collective crosses
the replica axes), per outer step, and the outer step's averaged over H.
The runs' directories (metrics.jsonl, loss.png) are kept under ``--runs``;
``--reuse`` keeps a finished one and reads its curves instead of training it again
(the steps are still compiled, for their bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EVAL = ("eval_every=24", "eval_batches=8", "checkpoint.every=0", "log_every=10")


def data_wire_bytes(compiled, mesh) -> float:
    """Wire bytes per device (ring algorithm) of a compiled program's collectives over ``data``, per call."""
    from shardlib.analysis.report.measure import measure_compiled

    return sum(c.total_wire_bytes for c in measure_compiled(compiled, mesh).collectives if "data" in c.axes)


def compile_ahead(run):
    """``run`` with its train (and outer) step compiled from abstract inputs, and their bytes over data."""
    import jax

    from shardlib.analysis.report.measure import abstract_batch
    from shardlib.training.train_state import abstract_state

    params, opt_state = abstract_state(run.model, run.tx, run.shardings)
    with jax.set_mesh(run.mesh):
        step = run.train_step.lower(params, opt_state, abstract_batch(run.cfg, run.batch_sharding)).compile()
        outers = tuple(o.lower(params, opt_state).compile() for o in run.outer_steps)  # one per fragment
    bytes_ = (data_wire_bytes(step, run.mesh), sum(data_wire_bytes(o, run.mesh) for o in outers))
    return dataclasses.replace(run, train_step=step, outer_steps=outers), bytes_


def curves(run_dir) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) (step, loss) pairs from a run's metrics.jsonl; an eval loss at the step of the network it
    scored (DiLoCo: ``anchor_step``, the outer parameters' step)."""
    from shardlib.training.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    return train, [(r.get("anchor_step", r["step"]), r["loss"]) for r in rows if r["split"] == "eval"]


def parse_item(text: str) -> tuple[int, str, str]:
    """``H[@lr|@local][+first|+both]`` -> (H, the outer lr or "local" or "", the averaged AdamW moments)."""
    text, _, moments = text.partition("+")
    every, _, lr = text.partition("@")
    return int(every), lr, moments or "none"


def _log(name: str, line: str) -> None:
    print(f"[{name}] {line}", flush=True)


def plot(results: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2), layout="constrained")
    for r in results:
        steps, losses = zip(*r["train"], strict=True)
        window = max(1, min(5, len(losses)))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        (line,) = left.plot(steps[window - 1 :], smooth, label=r["label"], lw=1.5 if r["every"] else 2.5)
        eval_steps, eval_losses = zip(*r["eval"], strict=True)
        right.plot(eval_steps, eval_losses, "o-", color=line.get_color(), ms=3)
    left.set(title="training loss (mean of 5 logged steps)", xlabel="step", ylabel="cross-entropy (nats)")
    right.set(title="held-out loss (DiLoCo: outer parameters)", xlabel="step", ylabel="cross-entropy (nats)")
    finals = [r["eval"][-1][1] for r in results]
    right.set_ylim(min(finals) * 0.97, max(finals) * 1.25)  # the second half of training
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, frameon=False)  # below both plots: it covers no curve
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--mesh", default="meshes/cpu-8.yaml")
    parser.add_argument(
        "--diloco",
        default="4,8,16",
        help="runs: H, H@outer_lr or H@local, each +first or +both to average AdamW's moments",
    )
    parser.add_argument("--out", default="docs/diloco_loss.png")
    parser.add_argument("--runs", default="runs/bench-diloco")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --runs, read their curves")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    import pathlib

    from shardlib.core.mesh import build_mesh, describe_mesh, load_mesh_spec, prepare_devices
    from shardlib.training.config import load_config
    from shardlib.training.setup import setup_training
    from shardlib.training.trainer import train

    spec = load_mesh_spec(args.mesh)
    prepare_devices(spec)
    mesh = build_mesh(spec)
    results = []
    for every, lr, moments in [(0, "", "none")] + [parse_item(x) for x in args.diloco.split(",")]:
        local = lr == "local"
        suffix = f"-lr{lr}" if lr not in ("", "local") else ""
        suffix += f"-moments-{moments}" if moments != "none" else ""
        name = f"{'local-sgd' if local else 'diloco'}-h{every}{suffix}" if every else "dp"
        run_dir = pathlib.Path(args.runs) / name
        if not args.reuse:
            shutil.rmtree(run_dir, ignore_errors=True)
        outer = [f"outer.algorithm={'local_sgd' if local else 'diloco'}", f"outer.inner_steps={every}"] if every else []
        outer += [f"outer.learning_rate={float(lr)}"] if lr and not local else []
        outer += [f"outer.average_moments={moments}"] if every else []
        cfg = load_config(args.config, [*args.overrides, *EVAL, *outer, f"run_dir={run_dir}"])
        run, (step_bytes, outer_bytes) = compile_ahead(setup_training(cfg, mesh))
        result = train(cfg, mesh, setup=run, progress=False, log=functools.partial(_log, name))
        train_curve, eval_curve = curves(run_dir)
        label = (
            f"DiLoCo H={every}, outer lr {cfg.outer.learning_rate:g}" if every else f"data parallel ({cfg.sharding})"
        )
        label = f"local SGD H={every}" if local else label
        label += {"none": "", "first": ", mu averaged", "both": ", mu and nu averaged"}[moments]
        averaged = step_bytes + outer_bytes / every if every else step_bytes
        results.append(
            {
                "label": label,
                "every": every,
                "train": train_curve,
                "eval": eval_curve,
                "held_out": eval_curve[-1][1],
                "step_bytes": step_bytes,
                "outer_bytes": outer_bytes,
                "averaged": averaged,
                "tokens_per_s": result.tokens_per_second,
            }
        )
    dp = results[0]
    print(f"\n{cfg.model.num_params():,} params, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens on "
          f"{describe_mesh(mesh)}; DiLoCo over data: outer SGD, Nesterov momentum {cfg.outer.momentum}")  # fmt: skip
    header = (
        f"{'run':<32}{'held-out':>10}{'vs dp':>8}{'B/step over data':>18}{'inner':>10}{'outer':>12}{'tokens/s':>10}"
    )
    print(header)
    for r in results:
        ratio = r["held_out"] / dp["held_out"] - 1
        inner = f"{r['step_bytes']:,.0f}" if r["every"] else "-"
        scored = f" (anchor of step {r['eval'][-1][0]})" if r["every"] else ""
        outer = f"{r['outer_bytes']:,.0f}" if r["every"] else "-"
        print(
            f"{r['label']:<32}{r['held_out']:>10.4f}{ratio:>+8.2%}{r['averaged']:>18,.0f}{inner:>10}{outer:>12}"
            + (f"{r['tokens_per_s']:>10,.0f}" if r["tokens_per_s"] else f"{'(reused)':>10}")
            + scored
        )
    plot(results, args.out, f"{args.config} on {describe_mesh(mesh)}: data parallelism vs DiLoCo over data")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
