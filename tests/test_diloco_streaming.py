"""Streaming DiLoCo: the layers in F fragments, one fragment's outer step every H/F inner steps.

Held to the algorithm written out element by element on single-device replicas
(``diloco_support.paper_diloco`` with fragments), and to its bytes: each outer step all-reduces one
fragment, so the peak over the replica axes is P/F while every fragment still syncs every H steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from shardlib.analysis.report.collectives import find_collectives
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.analysis.report.measure import abstract_batch, measure_compiled
from shardlib.core.mesh import mesh_axis_sizes
from shardlib.parallel.compression import payload_bytes
from shardlib.training.checkpoint import Checkpointer
from shardlib.training.diloco_steps import model_fragments
from shardlib.training.parallel_plan import build_plan
from shardlib.training.setup import setup_training
from shardlib.training.state_layout import error_feedback_layout
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import train
from tests.diloco_support import (
    assert_matches_paper,
    compiled,
    contiguous_rows,
    diloco_config,
    eval_rows,
    held_out_loss,
    local_param_bytes,
    paper_diloco,
    run_steps,
    token_batches,
)
from tests.support import mesh_of

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


def resumes_bitwise(run, tmp_path, saved_at: int) -> None:
    """Saved after step ``saved_at`` and restored: the rest of the 9 steps give the uninterrupted run's
    losses bitwise."""
    batches = token_batches(8)
    _, _, straight = run_steps(run, run.init_state(), batches)
    params_R, opt_state, first = run_steps(run, run.init_state(), batches[:saved_at])
    with Checkpointer(tmp_path / "checkpoints", every=saved_at, keep=2) as checkpointer:
        checkpointer.save(saved_at, params_R, opt_state, {"data_position": saved_at, **run.checkpoint_layout()})
        checkpointer.wait()
        params_R, opt_state, _ = checkpointer.restore(saved_at, *abstract_state(run.model, run.tx, run.shardings))
    _, _, rest = run_steps(run, (params_R, opt_state), batches[saved_at:], first_step=saved_at + 1)
    assert list(first) + list(rest) == list(straight)


def test_a_checkpoint_between_two_fragments_outer_steps_resumes_bitwise(tmp_path, streaming):
    """Saved after step 3 (fragment 0 synced at 2, fragment 1 due at 4): each fragment's anchor and
    momentum come back."""
    resumes_bitwise(streaming[0], tmp_path, saved_at=3)


def test_held_out_loss_scores_each_fragment_as_of_its_own_last_outer_step(tmp_path, streaming):
    """What streaming evaluates: the anchor, each fragment as of its own last outer step. Evaluated after steps
    3, 6 and 9 (fragment 0 syncs after 2, 6, ..., fragment 1 after 4, 8, ...), the held-out loss is the one-device
    loss of that network; ``anchor_step`` names the newest fragment's step (2, 6, 8). After step 3 fragment 1's
    rows are still the initial network's; after step 9 fragment 0's are those of step 6."""
    run, _, _ = streaming
    no_saves = run.cfg.checkpoint.model_copy(
        update={"every": 0}
    )  # only the last step's: saves cost, prove nothing here
    cfg = run.cfg.model_copy(
        update={"run_dir": str(tmp_path), "eval_every": 3, "eval_batches": 1, "checkpoint": no_saves}
    )
    result = train(cfg, run.mesh, setup=run, progress=False, log=lambda _: None)
    anchors = {}
    for step in (3, 6, 9):
        _, opt_state, _ = run_steps(run, run.init_state(), token_batches(8)[:step])
        anchors[step] = jax.device_get(opt_state["anchor"])
    for step, loss in result.eval_losses:
        assert loss == pytest.approx(held_out_loss(cfg, anchors[step]), rel=1e-5), step
    assert [(r["step"], r["anchor_step"]) for r in eval_rows(tmp_path)] == [(3, 2), (6, 6), (9, 8)]

    params0 = jax.tree.map(lambda p: np.asarray(p)[0], jax.device_get(run.init_state()[0]))
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params0)[0]]
    rows_of = [dict(zip(names, f.rows, strict=True)) for f in model_fragments(run.model, F)]

    def rows(tree, fragment: int):
        leaves = dict(zip(names, jax.tree.leaves(tree), strict=True))
        return [np.asarray(leaves[n])[slice(*r)] for n, r in rows_of[fragment].items() if r is not None]

    def same(a, b) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(rows(anchors[3], 1), rows(params0, 1)) and not same(rows(anchors[3], 0), rows(params0, 0))
    assert same(rows(anchors[9], 0), rows(anchors[6], 0)) and not same(rows(anchors[9], 1), rows(anchors[6], 1))


# --------------------------------------------------------------------------- the pseudo-gradient compressed


def _fragment_parts(run, count=F) -> list[dict]:
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(run.model.params)[0]]
    return [
        {n: r for n, r in zip(names, f.rows, strict=True) if r is not None} for f in model_fragments(run.model, count)
    ]


def _with_outer(cfg, mesh, **settings):
    """A setup whose outer settings are replaced (e.g. compression ``fp32``: not a config choice, the explicit
    reduction without rounding)."""
    plan = build_plan(cfg, mesh)
    outer = dataclasses.replace(plan.outer, settings=dataclasses.replace(plan.outer.settings, **settings))
    return setup_training(cfg, mesh, dataclasses.replace(plan, outer=outer))


def test_each_fragments_compressed_reduction_matches_the_papers_algorithm_when_exact():
    """Fragments as segments of the compressed reduction (its all-to-all and all-gather, each fragment's own
    residual slices), in float32 so that nothing rounds: the paper's streaming algorithm within 1e-5."""
    cfg = diloco_config(batch_size=8, model={"n_layers": 2}, outer={"inner_steps": EVERY, "fragments": F})
    run = _with_outer(cfg, mesh_of(data=2, model=2), compression="fp32")
    assert len(run.compression.segments) == F
    params0 = jax.tree.map(lambda p: p[0], jax.device_get(run.init_state()[0]))
    batches = token_batches(8)
    params_R, opt_state, losses = run_steps(run, run.state_from(params0), batches)
    ref = paper_diloco(run.cfg, params0, batches, contiguous_rows(8, 2), every=EVERY, fragments=_fragment_parts(run))
    assert_matches_paper(run, params_R, opt_state, losses, ref)


@pytest.fixture(scope="module")
def int8_streaming():
    cfg = diloco_config(
        batch_size=8, model={"n_layers": 2}, outer={"inner_steps": EVERY, "fragments": F, "compression": "int8"}
    )
    return compiled(setup_training(cfg, mesh_of(data=2, model=2)))


def test_an_int8_fragment_step_sends_its_own_values_compressed_and_keeps_its_own_residuals(int8_streaming):
    """Fragment f's step sends 2(R-1)/R of its segment's int8 payload (values and scales), and after it only
    that segment's slice of each residual has moved."""
    run, inner, _ = int8_streaming
    assert not [c for c in inner if "data" in c.axes], inner
    segments = run.compression.segments
    for segment, outer in zip(segments, run.outer_steps, strict=True):
        over_data = [c for c in measure_compiled(outer, run.mesh).collectives if "data" in c.axes]
        sent = sum(c.total_wire_bytes for c in over_data if c.buffer_bytes > 4)  # less the 4-byte NaN check
        assert sent == pytest.approx(2 * (2 - 1) / 2 * payload_bytes(segment.size, "int8"))
    # A checkpoint records the segments: resumed with another F, the residuals restart from zero.
    assert error_feedback_layout(run.compression)["segments"] == [s.size for s in segments]
    first, second = segments
    state = run.init_state()
    for step, moved in ((1, [first]), (3, [first, second])):  # fragment 0 syncs after 2, fragment 1 after 4
        state = run_steps(run, state, token_batches(8)[step - 1 : step + 1], first_step=step)[:2]
        worker = np.asarray(jax.device_get(state[1]["error_feedback"]["worker"]))
        for segment in segments:
            own = worker[:, segment.offset : segment.offset + segment.size]
            assert (np.abs(own).max() > 0) == (segment in moved), (step + 1, segment.offset)


# --------------------------------------------------------------------------- the all-reduce beside the next step


# AdamW's eps at 1e-6: at 1e-8, embedding rows whose tokens are rare have second moments near eps^2, and
# one step multiplies a 1-ulp difference between the run and the reference there about 100-fold (3.7e-9 ->
# 4e-7 in the step after a fragment lands, measured); the algorithm under test is the outer step's.
STABLE_ADAM = {"lr": 1e-2, "warmup_steps": 2, "eps": 1e-6}


@pytest.fixture(scope="module")
def overlapped():
    outer = {"inner_steps": EVERY, "fragments": F, "overlap_steps": 1, "mixing": 0.5}
    cfg = diloco_config(batch_size=8, model={"n_layers": 2}, outer=outer, optimizer=STABLE_ADAM)
    return setup_training(cfg, mesh_of(data=2, model=2))


@pytest.mark.parametrize("count, mixing", [(F, 0.5), (1, 0.0)], ids=["2-fragments-mixing", "whole"])
def test_overlapped_outer_steps_match_the_papers_algorithm(overlapped, count, mixing):
    """tau = 1: fragment f's pseudo-gradient, taken after its step, lands one inner step later, where each
    replica keeps alpha of its own rows. Against the paper's loop within 1e-5, streaming and whole."""
    run = overlapped
    if count != F:
        outer = {"inner_steps": EVERY, "fragments": count, "overlap_steps": 1, "mixing": mixing}
        cfg = diloco_config(batch_size=8, model={"n_layers": 2}, outer=outer, optimizer=STABLE_ADAM)
        run = setup_training(cfg, run.mesh)
    assert not run.outer_due(EVERY) and run.train_step_for(EVERY + 1) is not run.train_step
    params0 = jax.tree.map(lambda p: p[0], jax.device_get(run.init_state()[0]))
    batches = token_batches(8)
    params_R, opt_state, losses = run_steps(run, run.state_from(params0), batches)
    parts = _fragment_parts(run, count)
    ref = paper_diloco(
        run.cfg, params0, batches, contiguous_rows(8, 2), every=EVERY, fragments=parts, overlap=1, mixing=mixing
    )
    assert_matches_paper(run, params_R, opt_state, losses, ref)


def test_overlapped_the_anchor_step_follows_where_the_outer_step_lands(overlapped):
    """With tau = 1 the outer step due after step 2 lands in step 3 (and 4's in 5): the anchor changes after
    steps 3 and 5 only, and ``anchor_step``, what an evaluation says it scored, moves then (to 2, then 4)."""
    run, state, moved = overlapped, overlapped.init_state(), []
    before = jax.device_get(state[1]["anchor"])
    for step, batch in enumerate(token_batches(8)[:5], start=1):
        *state, _ = run_steps(run, state, [batch], first_step=step)
        after = jax.device_get(state[1]["anchor"])
        moved.append(not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))))
        before = after
    assert moved == [False, False, True, False, True]
    assert [run.anchor_step(step) for step in range(1, 6)] == [0, 0, 2, 2, 4]


def _ancestors(computation, name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for operand in computation.symbols[todo.pop()].operands:
            if operand in computation.symbols and operand not in seen:
                seen.add(operand)
                todo.append(operand)
    return seen


def test_an_overlapped_steps_all_reduce_waits_for_nothing_the_inner_step_computes(overlapped):
    """The fragment's all-reduce over data is in the inner step's program and none of its inputs comes
    from a matmul (the forward, the backward, the update): a scheduler is free to run it beside them.
    Its bytes are the fragment's, as the synchronous outer step's."""
    run = overlapped
    params, opt_state = abstract_state(run.model, run.tx, run.shardings)
    with jax.set_mesh(run.mesh):
        program = run.overlapped_steps[0].lower(params, opt_state, abstract_batch(run.cfg, run.batch_sharding))
        text = program.compile().as_text()
        outer_text = run.outer_steps[0].lower(params, opt_state).compile().as_text()
    module = parse_hlo(text)
    found = [c for c in find_collectives(module, mesh_axis_sizes(run.mesh)) if "data" in c.axes]
    expected = [c for c in find_collectives(parse_hlo(outer_text), mesh_axis_sizes(run.mesh)) if "data" in c.axes]
    assert sum(c.total_wire_bytes for c in found) == pytest.approx(sum(c.total_wire_bytes for c in expected))
    entry = module.computations[module.entry]
    reduces = [i for i in entry.instructions if i.opcode.startswith("all-reduce") and i.name in {c.name for c in found}]
    assert reduces
    dots = {
        i.name
        for i in entry.instructions
        if i.opcode in ("dot", "convolution")
        or any(c.opcode == "dot" for callee in i.callees() for c in module.computations[callee].instructions)
    }
    assert dots, "the inner step's matmuls are not where this test looks for them"
    for reduce in reduces:
        assert not _ancestors(entry, reduce.name) & dots, f"{reduce.name} waits for the inner step's matmuls"


def test_a_checkpoint_with_an_outer_step_in_flight_resumes_bitwise(tmp_path, overlapped):
    """Saved after step 2, whose fragment's all-reduce runs inside step 3: the in-flight outer step is
    taken again from the saved parameters."""
    resumes_bitwise(overlapped, tmp_path, saved_at=2)


# --------------------------------------------------------------------------- the inner moments averaged


@pytest.mark.parametrize("count, moments", [(1, "both"), (F, "first")], ids=["whole-both", "2-fragments-first"])
def test_averaged_inner_moments_match_the_papers_algorithm_and_cost_one_all_reduce_each(count, moments):
    """At each outer step the replicas' AdamW mu (and nu) become their mean, on the fragment's rows: the
    paper's loop with that averaging within 1e-5, and each outer step all-reduces the pseudo-gradient and
    each averaged moment, 2(R-1)/R of the fragment's float32 bytes apiece."""
    outer = {"inner_steps": EVERY, "fragments": count, "average_moments": moments}
    run, _, outer_collectives = compiled(
        setup_training(
            diloco_config(batch_size=8, model={"n_layers": 2}, outer=outer, optimizer=STABLE_ADAM),
            mesh_of(data=2, model=2),
        )
    )
    params0 = jax.tree.map(lambda p: p[0], jax.device_get(run.init_state()[0]))
    batches = token_batches(8)
    params_R, opt_state, losses = run_steps(run, run.state_from(params0), batches)
    parts = _fragment_parts(run, count) if count > 1 else None
    ref = paper_diloco(run.cfg, params0, batches, contiguous_rows(8, 2), every=EVERY, fragments=parts, moments=moments)
    assert_matches_paper(run, params_R, opt_state, losses, ref)
    over_data = sum(c.total_wire_bytes for c in outer_collectives if "data" in c.axes)
    copies = 1 + {"first": 1, "both": 2}[moments]
    assert over_data == pytest.approx(2 * (2 - 1) / 2 * local_param_bytes(run) * copies)
