"""Mixture of experts, capacity against dropless: step time, dropped tokens, expert-axis bytes, memory.

    python bench/moe.py [--expert 4] [--capacity-factors 0.5,1.0,1.25,2.0] [--steps 8] [--out runs/bench-moe.json]

Trains configs/tiny-moe.yaml (8 experts, top-2, every other layer) on 8
emulated CPU devices, data (8 / expert) x expert: the dense model as a
baseline, the capacity dispatch once per capacity factor, and the dropless
dispatch (``model.moe.dispatch: dropless``; on XLA:CPU its all-gather
transport). Every setting is compiled first; then the timed steps alternate
between the settings (one step of each per round, ``--steps`` rounds), so a
load that comes and goes on a shared machine lands on all of them, and each
row reports its median. For each: the fraction of (token, choice) pairs
dropped (mean over the steps), the bytes each device sends per step over the
expert axis in the compiled HLO (all-to-all, all-gather and reduce-scatter
among the expert peers, trip counts applied) against the report's
prediction (``shardlib.analysis.report``), the compiled step's temporary
memory per device, and, for dropless, the report's bytes had the step used
``ragged_all_to_all`` (which XLA:CPU cannot compile). Numbers from one run
are comparable with each other only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPERT_KINDS = ("all-to-all", "all-gather", "reduce-scatter")


def _settings(capacity_factors: str) -> list[tuple[str, list[str]]]:
    settings = [("dense", ["model.moe.n_experts=0"])]
    settings += [
        (f"capacity {cf:g}", [f"model.moe.capacity_factor={cf}"]) for cf in map(float, capacity_factors.split(","))
    ]
    return settings + [("dropless", ["model.moe.dispatch=dropless"])]


def _predicted(cfg, shape, transport: str | None = None) -> float:
    """The report's expert-axis wire bytes per device and step for ``cfg`` (a forced transport if given)."""
    from shardlib.analysis.report.analytic import predict_terms
    from shardlib.analysis.report.layout import resolve_layout

    if transport is not None:
        moe = cfg.model.moe.model_copy(update={"dropless_transport": transport})
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"moe": moe})})
    return sum(t.wire_bytes for t in predict_terms(resolve_layout(cfg, shape), "cpu") if t.strategy == "experts")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", type=int, default=4, help="size of the expert axis (the rest is data)")
    parser.add_argument("--capacity-factors", default="0.5,1.0,1.25,2.0")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (one step of every setting each)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default="runs/bench-moe.json")
    args = parser.parse_args(argv)
    if 8 % args.expert:
        parser.error(f"--expert {args.expert} does not divide 8 devices")

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from shardlib.analysis.hlo import collectives
    from shardlib.core.mesh import build_mesh, mesh_spec
    from shardlib.training.config import load_config
    from shardlib.training.data import load_token_splits
    from shardlib.training.setup import setup_training

    x = args.expert
    mesh = build_mesh(mesh_spec(data=8 // x, expert=x), jax.devices("cpu")[:8])
    base = ["steps=1000", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}"]
    tokens = load_token_splits(load_config("configs/tiny-moe.yaml").data)[0]
    runs = {}
    for name, overrides in _settings(args.capacity_factors):
        cfg = load_config("configs/tiny-moe.yaml", base + overrides)
        run = setup_training(cfg, mesh)
        loader = run.loader(tokens, seed=cfg.seed)
        params, opt_state = run.init_state()
        batch = loader.next()
        compiled = run.train_step.lower(params, opt_state, batch).compile()
        found = [c for c in collectives(compiled.as_text()) if c.kind in EXPERT_KINDS and c.group_size == x]
        params, opt_state, metrics = run.train_step(params, opt_state, batch)  # compiles
        jax.block_until_ready(metrics)
        runs[name] = {
            "cfg": cfg,
            "run": run,
            "loader": loader,
            "state": (params, opt_state),
            "times": [],
            "dropped": [],
            "sent": sum(c.wire_bytes * c.executions for c in found),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        }
    for _ in range(args.steps):  # alternating: one step of every setting per round
        for r in runs.values():
            batch = r["loader"].next()
            start = time.perf_counter()
            params, opt_state, metrics = r["run"].train_step(*r["state"], batch)
            jax.block_until_ready(metrics)
            r["times"].append(time.perf_counter() - start)
            r["state"], r["loss"] = (params, opt_state), float(metrics["loss"])
            r["dropped"].append(float(metrics.get("moe_dropped_fraction", 0.0)))

    print(
        f"configs/tiny-moe.yaml on 8 cpu devices (data {8 // x} x expert {x}), batch {args.batch_size} x {args.seq_len}"
    )
    print(
        f"{'dispatch':>14}{'step ms':>9}{'dropped':>9}{'expert KiB':>12}{'report KiB':>12}{'ratio':>7}"
        f"{'temp MiB':>10}{'ragged KiB':>12}"
    )
    rows = []
    shape = dict(mesh.shape)
    for name, r in runs.items():
        cfg = r["cfg"]
        dropless = cfg.model.moe.n_experts and cfg.model.moe.dispatch == "dropless"
        predicted = _predicted(cfg, shape) if cfg.model.moe.n_experts else 0.0
        ragged = _predicted(cfg, shape, "ragged_all_to_all") if dropless else None
        row = {
            "dispatch": name,
            "step_ms": 1e3 * statistics.median(r["times"]),
            "dropped_fraction": float(np.mean(r["dropped"])),
            "expert_axis_bytes_per_step": r["sent"],
            "report_bytes_per_step": predicted,
            "temp_bytes_per_device": r["temp_bytes"],
            "ragged_report_bytes_per_step": ragged,
            "loss": r["loss"],
        }
        rows.append(row)
        ratio = f"{r['sent'] / predicted:7.3f}" if predicted else f"{'-':>7}"
        print(
            f"{name:>14}{row['step_ms']:9.1f}{row['dropped_fraction']:9.3f}{r['sent'] / 1024:12.1f}"
            f"{predicted / 1024:12.1f}{ratio}{r['temp_bytes'] / 2**20:10.2f}"
            + (f"{ragged / 1024:12.1f}" if ragged is not None else f"{'-':>12}")
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mesh": {"data": 8 // x, "expert": x}, "batch_size": args.batch_size, "seq_len": args.seq_len}
    out.write_text(json.dumps({**meta, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
