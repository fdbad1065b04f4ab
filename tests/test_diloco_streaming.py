"""Streaming DiLoCo: the layers in F fragments, one fragment's outer step every H/F inner steps.

Held to the algorithm written out element by element on single-device replicas
(``test_diloco.paper_diloco`` with fragments), and to its bytes: each outer step all-reduces one
fragment, so the peak over the replica axes is P/F while every fragment still syncs every H steps.
"""

from __future__ import annotations

import math

import jax
import pytest

from shardlib.analysis.report.measure import measure_compiled
from shardlib.training.checkpoint import Checkpointer
from shardlib.training.setup import setup_training
from shardlib.training.step import model_fragments
from shardlib.training.train_state import abstract_state
from tests.support import mesh_of
from tests.test_diloco import (
    assert_matches_paper,
    compiled,
    contiguous_rows,
    diloco_config,
    paper_diloco,
    run_steps,
    token_batches,
)

EVERY, F = 4, 2


@pytest.fixture(scope="module")
def streaming():
    cfg = diloco_config(batch_size=8, model={"n_layers": 2}, outer={"inner_steps": EVERY, "fragments": F})
    return compiled(setup_training(cfg, mesh_of(data=2, model=2)))


def test_the_fragments_cut_the_layers_and_spread_the_rest():
    """2 layers in 2 row ranges; the embedding and the output projection (the same size) one to each,
    the final norm to one of them."""
    cfg = diloco_config(model={"n_layers": 2}, outer={"inner_steps": EVERY, "fragments": F})
    run = setup_training(cfg, mesh_of(data=2))
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(run.model.params)[0]]
    parts = [dict(zip(names, f.rows, strict=True)) for f in model_fragments(run.model, F)]
    layers = [n for n in names if n.startswith("['layers']")]
    assert layers and all(parts[0][n] == (0, 1) and parts[1][n] == (1, 2) for n in layers)
    assert parts[0]["['embed']['embedding']"] is not None and parts[1]["['embed']['embedding']"] is None
    assert parts[1]["['unembed']"] is not None and parts[0]["['unembed']"] is None
    assert sum(p["['final_norm']"] is not None for p in parts) == 1


def test_streaming_matches_the_papers_algorithm(streaming):
    run, _, _ = streaming
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(run.model.params)[0]]
    parts = [{n: r for n, r in zip(names, f.rows, strict=True) if r is not None} for f in model_fragments(run.model, F)]
    params0 = jax.tree.map(lambda p: p[0], jax.device_get(run.init_state()[0]))
    batches = token_batches(8)
    params_R, opt_state, losses = run_steps(run, run.state_from(params0), batches)
    ref = paper_diloco(run.cfg, params0, batches, contiguous_rows(8, 2), every=EVERY, fragments=parts)
    assert_matches_paper(run, params_R, opt_state, losses, ref)


def test_each_outer_step_all_reduces_one_fragment(streaming):
    """Fragment f's step moves 2(R-1)/R of its own bytes over data; the inner step nothing."""
    run, inner, _ = streaming
    assert not [c for c in inner if "data" in c.axes], inner
    shardings = jax.tree.leaves(run.shardings.opt_state["anchor"])
    leaves = jax.tree.leaves(run.model.params)
    total = 0
    for f, outer in zip(model_fragments(run.model, F), run.outer_steps, strict=True):
        held = 0
        for leaf, sharding, rows in zip(leaves, shardings, f.rows, strict=True):
            if rows is not None:
                shape = (rows[1] - rows[0], *leaf.shape[1:]) if leaf.ndim else ()
                held += math.prod(sharding.shard_shape(shape)) * leaf.dtype.itemsize
        over_data = [c for c in measure_compiled(outer, run.mesh).collectives if "data" in c.axes]
        assert sum(c.total_wire_bytes for c in over_data) == pytest.approx(2 * (2 - 1) / 2 * held)
        total += held
    assert total == sum(
        math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize for p, s in zip(leaves, shardings, strict=True)
    )


def test_a_checkpoint_between_two_fragments_outer_steps_resumes_bitwise(tmp_path, streaming):
    """Saved after step 3 (fragment 0 synced at 2, fragment 1 due at 4) and restored: steps 4..9 give
    the uninterrupted run's losses bitwise (each fragment's anchor and momentum come back)."""
    run, _, _ = streaming
    batches = token_batches(8)
    _, _, straight = run_steps(run, run.init_state(), batches)
    params_R, opt_state, first = run_steps(run, run.init_state(), batches[:3])
    with Checkpointer(tmp_path / "checkpoints", every=3, keep=2) as checkpointer:
        checkpointer.save(3, params_R, opt_state, {"data_position": 3, **run.checkpoint_layout()})
        checkpointer.wait()
        params_R, opt_state, _ = checkpointer.restore(3, *abstract_state(run.model, run.tx, run.shardings))
    _, _, rest = run_steps(run, (params_R, opt_state), batches[3:], first_step=4)
    assert list(first) + list(rest) == list(straight)
