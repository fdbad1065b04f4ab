"""Mixture of experts against the capacity factor: step time, dropped tokens, all-to-all bytes.

    python bench/moe.py [--expert 4] [--capacity-factors 0.5,1.0,1.25,2.0] [--steps 8] [--out runs/bench-moe.json]

Trains configs/tiny-moe.yaml (8 experts, top-2, every other layer) on 8
emulated CPU devices, data (8 / expert) x expert, once per capacity factor,
plus the dense model as a baseline. For each: the median time of a training
step (after one compiling step), the mean fraction of (token, choice) pairs
dropped over those steps (the router moves as it trains), and the all-to-all
bytes each device sends per step from the compiled HLO (trip counts applied)
against the formula: 4 all-to-alls per MoE layer (2 forward, 2 backward) of
the [E, G, C, D] buffer, (X-1)/X of it leaving the device. Numbers from one
run are comparable with each other only.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", type=int, default=4, help="size of the expert axis (the rest is data)")
    parser.add_argument("--capacity-factors", default="0.5,1.0,1.25,2.0")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting, after one compiling step")
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
    from shardlib.parallel.experts import dispatch_buffer_bytes
    from shardlib.training.config import load_config
    from shardlib.training.data import load_token_splits
    from shardlib.training.setup import setup_training

    x = args.expert
    mesh = build_mesh(mesh_spec(data=8 // x, expert=x), jax.devices("cpu")[:8])
    base = ["steps=1000", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}"]
    settings = [("dense", ["model.moe.n_experts=0"])]
    settings += [
        (f"{cf:g}", [f"model.moe.capacity_factor={cf}"]) for cf in map(float, args.capacity_factors.split(","))
    ]
    print(
        f"configs/tiny-moe.yaml on 8 cpu devices (data {8 // x} x expert {x}), batch {args.batch_size} x {args.seq_len}"
    )
    header = f"{'capacity':>9}{'step ms':>10}{'dropped':>9}{'a2a KiB/step':>14}{'formula KiB':>13}{'ratio':>7}"
    print(header)
    rows = []
    tokens = load_token_splits(load_config("configs/tiny-moe.yaml").data)[0]
    for name, overrides in settings:
        cfg = load_config("configs/tiny-moe.yaml", base + overrides)
        run = setup_training(cfg, mesh)
        loader = run.loader(tokens, seed=cfg.seed)
        params, opt_state = run.init_state()
        batch = loader.next()
        text = run.train_step.lower(params, opt_state, batch).compile().as_text()
        a2a = [c for c in collectives(text) if c.kind == "all-to-all"]
        sent = sum(c.wire_bytes * c.executions for c in a2a)
        moe = cfg.model.moe
        formula = 0.0
        if moe.n_experts:
            rows_per_device = args.batch_size // 8  # the batch splits over data x expert
            buffer = dispatch_buffer_bytes(
                rows_per_device, args.seq_len, moe.n_experts, moe.top_k, moe.capacity_factor, 4, cfg.model.d_model
            )
            formula = 4 * cfg.model.n_moe_layers * buffer * (x - 1) / x
        params, opt_state, metrics = run.train_step(params, opt_state, batch)  # compiles
        jax.block_until_ready(metrics)
        times, dropped = [], []
        for _ in range(args.steps):
            batch = loader.next()
            start = time.perf_counter()
            params, opt_state, metrics = run.train_step(params, opt_state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            dropped.append(float(metrics.get("moe_dropped_fraction", 0.0)))
        row = {
            "capacity_factor": None if name == "dense" else float(name),
            "step_ms": 1e3 * statistics.median(times),
            "dropped_fraction": float(np.mean(dropped)),
            "all_to_all_bytes_per_step": sent,
            "formula_bytes_per_step": formula,
            "loss": float(metrics["loss"]),
        }
        rows.append(row)
        ratio = f"{sent / formula:7.3f}" if formula else f"{'-':>7}"
        print(
            f"{name:>9}{row['step_ms']:10.1f}{row['dropped_fraction']:9.3f}{sent / 1024:14.1f}"
            f"{formula / 1024:13.1f}{ratio}"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mesh": {"data": 8 // x, "expert": x}, "batch_size": args.batch_size, "seq_len": args.seq_len}
    out.write_text(json.dumps({**meta, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
