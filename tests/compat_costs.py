"""CPU seconds of compatibility-walk runs, to price ``tests.test_compat.FEATURE_COST_S``.

``python -m tests.compat_costs [COMBO...]`` (features joined by ``+``, as the walk names its runs;
default: dp, then dp beside each feature, then dp with a pipeline beside each feature) runs each
combination's compiles in this process, one after the other, as the walk's cells do (the
initialisation, a pipeline's eval step, the train step; no reference), and prints their CPU
seconds. Run it on an idle machine; CPU time is what it reads, but a busy machine still slows it.
"""

from __future__ import annotations

import sys
import time

import jax

import tests.conftest  # noqa: F401  (8 emulated CPU devices and the suite's XLA flags, before JAX starts)
from shardlib.parallel import compat
from tests import test_compat as walk


def run_seconds(combo: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds of ``combo``'s compiles and first runs: ``init``, ``eval`` (pipelines; else 0), ``train``."""
    clock = time.process_time
    started = clock()
    raw, sizes = walk._config(combo)
    cfg = walk._cfg(raw)
    run = walk.sgd_setup(cfg, walk.mesh_of(**sizes))
    batch = walk._placed(run, walk._batch(cfg.model.vocab_size))
    params, opt_state = jax.block_until_ready(run.init_state())
    seconds = {"init": clock() - started, "eval": 0.0}
    if run.plan.pipeline is not None:
        started = clock()
        float(run.eval_step(params, batch))
        seconds["eval"] = clock() - started
    started = clock()
    float(run.train_step(params, opt_state, batch)[2]["loss"])
    seconds["train"] = clock() - started
    return seconds


def default_combos() -> list[tuple[str, ...]]:
    """dp; dp beside every feature the walk runs; a 1f1b pipeline under each preset and beside each of those features."""
    names = [n for n in compat.NAMES if n not in (walk.MULTIPROCESS, walk.DILOCO, *compat.PRESETS)]
    alone = [("dp",), *(("dp", n) for n in names)]
    piped = [(p, "pipeline") for p in compat.PRESETS[1:]] + [("dp", "pipeline", n) for n in names if n != "pipeline"]
    combos = [tuple(sorted(walk._closure(c), key=compat.NAMES.index)) for c in alone + piped]
    return [c for c in combos if walk._runnable(c)]


def main(argv: list[str]) -> int:
    combos = [tuple(arg.split("+")) for arg in argv] or default_combos()
    for combo in combos:
        s = run_seconds(combo)
        total = sum(s.values())
        print(
            f"{'+'.join(combo):40s} init {s['init']:5.2f} eval {s['eval']:5.2f} train {s['train']:5.2f} total {total:5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
