"""Throughput of the training step as the trainer runs it: tokens/s, step time, MFU, host time, compile time.

    python bench/throughput.py --config configs/gpt2-124m.yaml --mesh meshes/gpu-1.yaml \
        [--steps 20] [--warmup 3] [--json out.json] [--trace DIR] [--hlo DIR] [key=value ...]

Compiles the run's train step (the one ``train.py`` calls, with its
shardings and donation) and times it on the run's own batches:

* ``step_ms``: wall time per step with the host dispatching ahead, as the
  loop does between log steps (one wait, after the last step);
* ``synced_step_ms``: wall time per step when the host waits for every step:
  the device's time per step plus whatever the host adds between steps;
* ``host_ms``: what the host spends per step on its own, measured in the
  synced steps (nothing queued): reading and placing the batch
  (``batch_ms``) and dispatching the step (``dispatch_ms``). Dispatched ahead,
  the device sits idle between steps only if this exceeds its time per step
  (on XLA:CPU the "device" is the host's own threads: read it on a GPU);
* ``compile_s``: setting up, lowering and compiling the train step;
* tokens/s (all devices) and MFU per device, from the config's FLOPs per
  token (``ModelConfig.flops_per_token``: 6 N plus attention, PaLM's
  formula) and the chip's dense peak (``shardlib.training.metrics.PEAK_TFLOPS``,
  or ``peak_tflops=`` in the config); MFU is omitted where the peak is unknown
  (CPUs).

The JSON (``--json``) holds every figure with the device, JAX version, config
and commit, so two commits can be compared. ``--trace`` records
``--trace-steps`` more steps with ``jax.profiler`` (not timed: the profiler
slows what it records) and prints where their time goes by op category
(``shardlib.analysis.step_profile``: matmul, attention, elementwise and
fusions, copies, exposed collectives, idle device); the JSON holds it as
``profile``. ``--hlo`` writes the compiled HLO text.
Timed steps run in groups alternating pipelined and synced, so a drifting
machine shifts both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from shardlib.training.cli import add_run_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind (pipelined, synced)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before timing")
    parser.add_argument("--json", help="write the figures as JSON to this file")
    parser.add_argument(
        "--trace", help="trace --trace-steps more steps (after the timed ones) into this directory, and break them down"
    )
    parser.add_argument("--trace-steps", type=int, default=5, help="steps the trace holds (dispatched ahead)")
    parser.add_argument("--hlo", help="write the compiled train step's HLO text into this directory")
    return parser.parse_args(argv)


class StepTimer:
    """Runs the run's train step on its loader's batches, tracking the state it donates."""

    def __init__(self, run, loader, step_fn):
        self.run, self.loader, self.step_fn = run, loader, step_fn
        self.params, self.opt_state = run.init_state()
        self.step = 0
        self.batch_s: list[float] = []
        self.dispatch_s: list[float] = []

    def dispatch(self, timed: bool = False):
        """One step, not waited for; returns its metrics (device arrays). ``timed``: record the host's
        seconds for the batch and for the dispatch (meaningful when nothing is queued before it)."""
        start = time.perf_counter()
        batch = self.loader.next()
        got_batch = time.perf_counter()
        planned = self.run.train_step_for(self.step + 1)  # DiLoCo overlapped: an outer step inside
        step_fn = self.step_fn if planned is self.run.train_step else planned
        self.params, self.opt_state, metrics = step_fn(self.params, self.opt_state, batch)
        self.step += 1
        if self.run.outer_due(self.step):
            self.params, self.opt_state = self.run.outer_step_after(self.step)(self.params, self.opt_state)
        if timed:
            self.batch_s.append(got_batch - start)
            self.dispatch_s.append(time.perf_counter() - got_batch)
        return metrics

    def pipelined(self, steps: int) -> float:
        """Seconds per step, dispatching ahead and waiting once at the end."""
        import jax

        start = time.perf_counter()
        for _ in range(steps):
            metrics = self.dispatch()
        jax.block_until_ready((self.params, metrics))
        return (time.perf_counter() - start) / steps

    def synced(self, steps: int) -> list[float]:
        """Seconds of each step, waiting for every one."""
        import jax

        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready((self.dispatch(timed=True), self.params))
            times.append(time.perf_counter() - start)
        return times


def compile_step(cfg, mesh, hlo_dir: str | None):
    """(setup, seconds to set up and compile the train step, the compiled step); its HLO into ``hlo_dir``."""
    from shardlib.analysis.report.measure import compile_train_step

    start = time.perf_counter()
    run, compiled = compile_train_step(cfg, mesh)
    seconds = time.perf_counter() - start
    if hlo_dir:
        path = pathlib.Path(hlo_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "train_step.hlo.txt").write_text(compiled.as_text())
    return run, seconds, compiled


def figures(cfg, mesh, compiled, compile_s, pipelined, synced, batch, dispatch) -> dict:
    """The JSON document: every figure, and what it was measured on."""
    import jax

    from shardlib.core.mesh import describe_mesh
    from shardlib.training.metrics import mfu, peak_tflops

    device = mesh.devices.flat[0]
    step_s = statistics.median(pipelined)
    tokens = cfg.batch_size * cfg.seq_len
    per_device = tokens / step_s / mesh.size
    peak = cfg.peak_tflops or peak_tflops(device.device_kind, cfg.model.compute_dtype)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "device": device.device_kind,
        "devices": mesh.size,
        "mesh": describe_mesh(mesh),
        "jax": jax.__version__,
        "commit": commit.stdout.strip() or None,
        "config": cfg.model_dump(mode="json"),
        "tokens_per_step": tokens,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "synced_step_ms": 1e3 * statistics.median(synced),
        "batch_ms": 1e3 * statistics.median(batch),
        "dispatch_ms": 1e3 * statistics.median(dispatch),
        "host_ms": 1e3 * (statistics.median(batch) + statistics.median(dispatch)),
        "tokens_per_s": tokens / step_s,
        "flops_per_token": cfg.model.flops_per_token(cfg.seq_len),
        "peak_tflops": peak,
        "mfu": mfu(per_device, cfg.model.flops_per_token(cfg.seq_len), peak),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "memory": memory_figures(compiled, device),
    }


def memory_figures(compiled, device) -> dict:
    """Bytes per device: what the compiled step holds (arguments, outputs, temporaries) and, where
    the backend tracks it (GPUs), the most the device has held and can hold."""
    from shardlib.analysis.report.measure import compiled_memory

    held = compiled_memory(compiled)
    stats = device.memory_stats() or {}
    return {
        "arguments": held and held.arguments,
        "outputs": held and held.outputs,
        "aliased": held and held.aliased,
        "temporaries": held and held.temporaries,
        "peak_in_use": stats.get("peak_bytes_in_use"),
        "limit": stats.get("bytes_limit"),
    }


def _main(args: argparse.Namespace) -> int:
    import jax

    from shardlib.core.mesh import build_mesh
    from shardlib.training.cli import load_run
    from shardlib.training.data import load_token_splits

    cfg, spec = load_run(args)
    mesh = build_mesh(spec)
    run, compile_s, compiled = compile_step(cfg, mesh, args.hlo)
    # The compiled executable itself: calling the jitted function would compile it a second time.
    timer = StepTimer(run, run.loader(load_token_splits(cfg.data)[0], seed=cfg.seed), compiled)
    for _ in range(args.warmup):
        jax.block_until_ready(timer.dispatch())
    pipelined, synced = [], []
    groups = max(1, args.steps // 5)
    for _ in range(groups):  # alternate the two kinds, so drift shifts both alike
        pipelined.append(timer.pipelined(args.steps // groups))
        synced.extend(timer.synced(args.steps // groups))
    result = figures(cfg, mesh, compiled, compile_s, pipelined, synced, timer.batch_s, timer.dispatch_s)
    print(format_figures(result))
    if args.trace:
        result["profile"] = trace_steps(timer, args.trace, args.trace_steps, compiled.as_text())
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def trace_steps(timer: StepTimer, trace_dir: str, steps: int, hlo_text: str) -> dict:
    """Traces ``steps`` steps dispatched ahead, prints where their time goes, and returns that breakdown.

    These steps are not the timed ones: the profiler slows what it records.
    """
    import jax

    from shardlib.analysis.step_profile import format_profile, profile_steps

    jax.block_until_ready(timer.params)
    jax.profiler.start_trace(trace_dir)
    timer.pipelined(steps)
    jax.profiler.stop_trace()
    profile = profile_steps(trace_dir, hlo_text, steps)
    print(format_profile(profile))
    return profile.as_dict()


def format_figures(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOPS" if r["mfu"] is not None else ""
    return (
        f"{r['device']} x {r['devices']} ({r['mesh']}), jax {r['jax']}, commit {r['commit']}\n"
        f"  {r['tokens_per_s']:,.0f} tokens/s{mfu}\n"
        f"  step {r['step_ms']:.1f} ms dispatched ahead, {r['synced_step_ms']:.1f} ms waited for; "
        f"host {r['host_ms']:.2f} ms per step (batch {r['batch_ms']:.2f}, dispatch {r['dispatch_ms']:.2f}); "
        f"compile {r['compile_s']:.1f} s{_memory_line(r['memory'])}"
    )


def _memory_line(m: dict) -> str:
    gib = 2.0**30
    held = [m[k] for k in ("arguments", "temporaries") if m.get(k) is not None]
    line = f"\n  memory: arguments + temporaries {sum(held) / gib:.2f} GiB" if held else ""
    if m.get("peak_in_use") is not None and m.get("limit"):
        line += f", peak in use {m['peak_in_use'] / gib:.2f} of {m['limit'] / gib:.2f} GiB"
    return line


def main(argv=None) -> int:
    from shardlib.training.cli import run_guarded

    return run_guarded(_main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
