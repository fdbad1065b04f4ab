"""DiLoCo against data parallelism by replica count M, outer lr and H, at the same tokens.

    nice -n 10 python bench/diloco_trend.py [--config configs/tiny.yaml] [--steps 256]
        [--runs dp,1@0.7@8,2@0.7@8,4@0.7@8] [--out bench/results/diloco_trend.jsonl] [--fresh] [key=value ...]

The shape "Scaling Laws for DiLoCo" (Charles et al. 2025) measures at fixed
tokens: DiLoCo's held-out loss gap to data parallelism grows with the number of
replicas M and shrinks with model size, and M = 1 (one replica, outer Nesterov)
is at or slightly below data parallelism. Each run item is ``dp`` or
``M@outer_lr@H`` (DiLoCo, outer SGD with Nesterov momentum 0.9); every run
trains the config for ``--steps`` steps (a multiple of every H, so the last
outer step lands on the last step) of the same global batch, from the same
initial network on the same batches, the inner AdamW the config's (the data
parallel baseline's). DiLoCo with M replicas runs on a mesh of ``data: M``
over M emulated CPU devices (each replica a quarter of the batch at M = 4),
data parallelism on ``data: 4``. The score is the held-out loss of the outer
parameters (the anchor) at the last step, on the same 8 held-out batches.

One JSON line per run is appended to ``--out``; a run already there is kept
(``--fresh`` starts over), so the sweep can be stopped and resumed.
``--table`` prints the markdown table of ``--out`` (and ``--plot PNG`` draws
it) without training.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DP_REPLICAS = 4  # data parallelism's data axis (the loss does not depend on it)
EMULATED = 4


def parse_run(text: str) -> dict:
    """``dp`` or ``M@lr@H`` -> {name, replicas (0 for dp), outer_lr, every}."""
    if text == "dp":
        return {"name": "dp", "replicas": 0, "outer_lr": None, "every": 0}
    try:
        m, lr, every = text.split("@")
        run = {"replicas": int(m), "outer_lr": float(lr), "every": int(every)}
    except ValueError:
        raise SystemExit(f"error: run {text!r}: expected dp or M@outer_lr@H, e.g. 4@0.7@8") from None
    if run["replicas"] not in (1, 2, 4):
        raise SystemExit(f"error: run {text!r}: M must be 1, 2 or 4 ({EMULATED} emulated devices)")
    return {"name": f"M{run['replicas']}-lr{run['outer_lr']:g}-H{run['every']}", **run}


def overrides(run: dict, steps: int, run_dir: pathlib.Path) -> list[str]:
    """The config overrides of one run: its steps, one held-out evaluation at the end, DiLoCo's settings."""
    common = [f"steps={steps}", f"eval_every={steps}", "eval_batches=8", "checkpoint.every=0", "log_every=32"]
    common.append(f"run_dir={run_dir}")
    if not run["replicas"]:
        return common
    outer = ["outer.algorithm=diloco", f"outer.inner_steps={run['every']}", f"outer.learning_rate={run['outer_lr']}"]
    return common + outer


def train_one(config: str, run: dict, steps: int, extra: list[str], runs_dir: pathlib.Path) -> dict:
    """Trains one run and returns its record (final held-out loss of the outer parameters, wall seconds)."""
    import jax

    from shardlib.core.mesh import build_mesh, mesh_spec
    from shardlib.training.config import load_config
    from shardlib.training.trainer import train

    replicas = run["replicas"] or DP_REPLICAS
    if run["every"] and steps % run["every"]:
        raise SystemExit(f"error: --steps {steps} is not a multiple of H = {run['every']} (run {run['name']})")
    mesh = build_mesh(mesh_spec(data=replicas), jax.devices()[:replicas])
    run_dir = runs_dir / run["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(config, [*extra, *overrides(run, steps, run_dir)])
    started = time.perf_counter()
    result = train(cfg, mesh, progress=False, log=lambda line: print(f"[{run['name']}] {line}", flush=True))
    if result.stopped_by or not result.eval_losses or result.eval_losses[-1][0] != steps:
        raise SystemExit(f"error: run {run['name']} stopped before its last step's evaluation; nothing recorded")
    held_out = result.eval_losses[-1][1]
    return {
        **run,
        "config": config,
        "steps": steps,
        "tokens": steps * cfg.batch_size * cfg.seq_len,
        "params": cfg.model.num_params(),
        "held_out": held_out,
        "final_train_loss": result.losses[-1],
        "wall_s": round(time.perf_counter() - started, 1),
        "overrides": extra,
    }


def read_records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(records: list[dict]) -> str:
    """The markdown table: every run's held-out loss and its gap to data parallelism's (same config and steps)."""
    dp = {(r["config"], r["steps"]): r["held_out"] for r in records if not r["replicas"]}
    lines = ["| run | M | outer lr | H | held-out loss | vs data parallel |", "|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["replicas"], r["every"], r["outer_lr"] or 0)):
        base = dp.get((r["config"], r["steps"]))
        gap = f"{r['held_out'] / base - 1:+.2%}" if base and r["replicas"] else ""
        m, lr, every = (r["replicas"], f"{r['outer_lr']:g}", r["every"]) if r["replicas"] else ("-", "-", "-")
        lines.append(f"| {'DiLoCo' if r['replicas'] else 'data parallel'} | {m} | {lr} | {every} | "
                     f"{r['held_out']:.4f} | {gap} |")  # fmt: skip
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Held-out gap to data parallelism against the outer lr, one line per (M, H); best per M marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = {(r["config"], r["steps"]): r["held_out"] for r in records if not r["replicas"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    groups: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for r in records:
        if r["replicas"] and (base := dp.get((r["config"], r["steps"]))):
            groups.setdefault((r["replicas"], r["every"]), []).append((r["outer_lr"], 100 * (r["held_out"] / base - 1)))
    for (m, every), points in sorted(groups.items()):
        lrs, gaps = zip(*sorted(points), strict=True)
        left.plot(lrs, gaps, "o-" if every == min(e for _, e in groups) else "s--", label=f"M = {m}, H = {every}")
    left.axhline(0, color="black", lw=0.8)
    left.set(xlabel="outer learning rate (Nesterov 0.9)", ylabel="held-out loss vs data parallel (%)")
    left.legend(frameon=False)
    best = {}
    for (m, _), points in groups.items():
        best[m] = min(best.get(m, float("inf")), min(g for _, g in points))
    right.plot(sorted(best), [best[m] for m in sorted(best)], "o-")
    right.axhline(0, color="black", lw=0.8)
    right.set(xlabel="replicas M", ylabel="best gap over the sweep (%)", xticks=sorted(best))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("DiLoCo vs data parallelism at the same tokens (held-out loss of the outer parameters)")
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--runs", default="dp,1@0.7@8,2@0.7@8,4@0.7@8", help="dp or M@outer_lr@H, comma-separated")
    parser.add_argument("--out", default="bench/results/diloco_trend.jsonl")
    parser.add_argument("--runs-dir", default="runs/bench-diloco-trend")
    parser.add_argument("--fresh", action="store_true", help="forget the runs already in --out")
    parser.add_argument("--table", action="store_true", help="print --out's table and exit")
    parser.add_argument("--plot", help="draw --out's runs into this PNG")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.fresh and out.exists():
        out.unlink()
    if not args.table:
        import jax

        jax.config.update("jax_num_cpu_devices", EMULATED)
        out.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["name"], r["config"], r["steps"]) for r in read_records(out)}
        for run in map(parse_run, args.runs.split(",")):
            if (run["name"], args.config, args.steps) in done:
                continue
            record = train_one(args.config, run, args.steps, args.overrides, pathlib.Path(args.runs_dir))
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[{run['name']}] held-out {record['held_out']:.4f} in {record['wall_s']:.0f} s", flush=True)
    records = [r for r in read_records(out) if r["config"] == args.config and r["steps"] == args.steps]
    print(table(records))
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
