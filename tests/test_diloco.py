"""DiLoCo and local SGD (``shardlib.parallel.diloco``): against the paper's algorithm, in HLO, across a kill.

* H = 1 with local SGD (outer SGD at lr 1) and a linear inner optimizer is data
  parallelism: the same losses and parameters within 1e-5 (FSDP inside the replicas).
* H = 4 on data 4 matches DiLoCo written straight from the paper (Douillard et
  al. 2023, Algorithm 1): a loop over single-device replicas in plain JAX and
  optax, its outer Nesterov step by hand; so do tp, fsdp_tp, seq, accumulation,
  remat and fused attention inside the replicas (``compat.DILOCO_TESTS``).
* The compiled inner step has no collective over the replica axes; the outer
  step's all-reduces move 2(R-1)/R of the parameter bytes a device holds.
* A run killed in the middle of an outer period resumes bitwise; held-out evaluation
  scores the anchor; a checkpoint of another replica count is refused.

Compilation dominates on 2 cores: one model initialisation serves every test
(``state_from``), the single-device reference step compiles once, the module's
setup compiles its steps once (``compiled``) and serves the paper check, the
HLO check, the kill trial and the held-out evaluation; every test here that needs a
run uses it (``four``). The paper's algorithm and the shared helpers are in
``tests/diloco_support.py``; the config and setup refusals that need no run, in
``tests/test_diloco_refusals.py``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal

import jax
import numpy as np
import optax
import pytest

from shardlib.analysis.report.analytic import predict_terms
from shardlib.analysis.report.layout import resolve_layout
from shardlib.parallel import compat
from shardlib.training.checkpoint import Checkpointer, CheckpointError, restore_latest
from shardlib.training.setup import TrainingSetup, setup_training
from shardlib.training.state_layout import REPLICAS, restore_targets
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import train
from tests import procs
from tests.diloco_support import (
    EVERY,
    STEPS,
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
from tests.support import assert_trees_close, mesh_of

# --------------------------------------------------------------------------- four replicas over data


@dataclasses.dataclass(frozen=True)
class FourReplicas:
    run: TrainingSetup  # data 4 x model 2 (meshes/cpu-8.yaml), dp, H = 4; steps compiled ahead
    inner_collectives: list
    outer_collectives: list
    params0: object  # the initial network, on the host: every run here starts from it
    losses: np.ndarray  # of steps 1..STEPS from init_state, as train() runs them
    end: tuple  # (params_R, opt_state) after them


@pytest.fixture(scope="module")
def four() -> FourReplicas:
    run, inner, outer = compiled(setup_training(diloco_config(), mesh_of(data=4, model=2)))
    state = run.init_state()
    params0 = jax.tree.map(lambda p: np.asarray(p)[0], jax.device_get(state[0]))
    params_R, opt_state, losses = run_steps(run, state, token_batches(16))
    return FourReplicas(run, inner, outer, params0, losses, (params_R, opt_state))


def test_four_replicas_match_the_papers_algorithm(four):
    ref = paper_diloco(four.run.cfg, four.params0, token_batches(16), contiguous_rows(16, 4), every=EVERY)
    assert_matches_paper(four.run, *four.end, four.losses, ref)


def test_inner_steps_never_cross_the_replica_axes_and_the_outer_step_moves_2_n_1_over_n_p(four):
    assert not [c for c in four.inner_collectives if "data" in c.axes], four.inner_collectives
    over_data = [c for c in four.outer_collectives if "data" in c.axes]
    assert {c.kind for c in over_data} == {"all-reduce"}
    n, p = 4, local_param_bytes(four.run)
    assert sum(c.total_wire_bytes for c in over_data) == pytest.approx(2 * (n - 1) / n * p)
    assert sum(c.buffer_bytes * c.count for c in over_data) == p  # the float32 pseudo-gradient, once
    # The analytic model's bytes per step, averaged over the period, are the compiled outer step's / H.
    terms = predict_terms(resolve_layout(four.run.cfg, dict(four.run.mesh.shape)))
    (outer,) = [t for t in terms if t.strategy == "diloco"]
    assert outer.wire_bytes == pytest.approx(sum(c.total_wire_bytes for c in over_data) / EVERY)
    assert not [t for t in terms if "data" in t.axes and t is not outer]


# --------------------------------------------------------------------------- strategies inside the replicas


INSIDE = {
    # tensor parallel over model, the sequence over seq, 2 microbatches, remat: replicas over data.
    "tp+seq+accumulation+remat": (
        {"sharding": "tp", "grad_accum": 2, "model": {"n_layers": 1, "remat": "full"}},
        {"data": 2, "seq": 2, "model": 2},
        contiguous_rows(8, 2),
    ),
    # Replicas over expert (a batch axis of a dense model), FSDP over data and TP over model inside.
    "fsdp_tp+fused": (
        {"sharding": "fsdp_tp", "attention": {"impl": "fused"}, "outer": {"replica_axes": ["expert"]}},
        {"expert": 2, "data": 2, "model": 2},
        # Rows are blocks in (data, expert) order, 2 each: replica e holds the blocks of devices (d, e).
        [np.array([0, 1, 4, 5]), np.array([2, 3, 6, 7])],
    ),
    # DiLoCo across hosts, HSDP inside: replicas over data_replica, FSDP over data within each.
    "hsdp": (
        {"sharding": "hsdp", "outer": {"replica_axes": ["data_replica"]}},
        {"data_replica": 2, "data": 2},
        contiguous_rows(8, 2),
    ),
}


@pytest.mark.parametrize("name", INSIDE)
def test_inside_replicas_match_the_papers_algorithm(four, name):
    overrides, sizes, rows = INSIDE[name]
    outer = {"inner_steps": 2, **overrides.pop("outer", {})} if "outer" in overrides else {"inner_steps": 2}
    cfg = diloco_config(batch_size=8, outer=outer, **{k: v for k, v in overrides.items()})
    run, inner, outer_ops = compiled(setup_training(cfg, mesh_of(**sizes)))
    axes = cfg.outer.replica_axes
    assert not [c for c in inner if set(c.axes) & set(axes)], "an inner step crossed the replica axes"
    reduced = [c for c in outer_ops if set(c.axes) & set(axes)]
    assert sum(c.total_wire_bytes for c in reduced) == pytest.approx(local_param_bytes(run))  # 2(2-1)/2 x P
    batches = token_batches(8, 4)
    params_R, opt_state, losses = run_steps(run, run.state_from(four.params0), batches)
    ref = paper_diloco(cfg, four.params0, batches, rows, every=2)
    assert_matches_paper(run, params_R, opt_state, losses, ref)


def test_bfloat16_compute_inside_replicas(four):
    """bfloat16 compute in the replicas against the paper's loop in bfloat16 too: the losses of three steps
    (the third after an outer step) agree to bfloat16's rounding, which a sharding or outer-step mistake
    (an error of order 1e-2 and more in the loss) exceeds."""
    cfg = diloco_config(batch_size=8, outer={"inner_steps": 2}, model={"n_layers": 1, "compute_dtype": "bfloat16"})
    run = setup_training(cfg, mesh_of(data=2))
    batches = token_batches(8, 3)
    _, _, losses = run_steps(run, run.state_from(four.params0), batches)
    ref_losses, _, _ = paper_diloco(cfg, four.params0, batches, contiguous_rows(8, 2), every=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=2.0**-8 * 6)


# --------------------------------------------------------------------------- data parallelism


def test_h1_local_sgd_is_data_parallelism(four):
    """Averaging after every step of plain SGD is data parallelism (AdamW's state is per replica, so not
    with it). Replicas over expert, FSDP over data inside them, against FSDP over the same mesh."""
    sgd = optax.sgd(0.05)
    cfg = diloco_config(
        batch_size=8, sharding="fsdp", outer={"algorithm": "local_sgd", "inner_steps": 1, "replica_axes": ["expert"]}
    )
    mesh = mesh_of(expert=2, data=2)
    local = setup_training(cfg, mesh, optimizer=sgd)
    synchronous = setup_training(cfg.model_copy(update={"outer": type(cfg.outer)()}), mesh, optimizer=sgd)
    batches = token_batches(8, 5)
    params_R, opt_state, losses = run_steps(local, local.state_from(four.params0), batches)
    params, _, dp_losses = run_steps(synchronous, synchronous.state_from(four.params0), batches)
    np.testing.assert_allclose(losses, dp_losses, rtol=1e-5)
    params = jax.device_get(params)
    assert_trees_close(jax.device_get(opt_state["anchor"]), params, what="anchor")
    for r, replica in enumerate(
        jax.tree.transpose(
            jax.tree.structure(params), None, jax.tree.map(lambda p: list(np.asarray(p)), jax.device_get(params_R))
        )
    ):
        assert_trees_close(replica, params, what=f"replica {r}")


# --------------------------------------------------------------------------- a kill mid-period


def test_sigkill_in_the_middle_of_a_period_resumes_bitwise(tmp_path, four):
    """train.py is killed as soon as its save of step 3 is complete, the period 1..4 half done (it is then
    at most at step 6: the save of 6 waits for that of 3). Restored as the trainer restores
    (``restore_latest`` onto ``restore_targets``), the state holds every replica's parameters and inner
    state, the anchor and the momentum: the steps from there, through the outer steps at 4 and 8, give
    the uninterrupted run's losses bitwise, and so did the killed process's."""
    run_dir = tmp_path / "run"
    config = procs.write_config(diloco_config(run_dir), tmp_path / "diloco.yaml")
    proc = procs.Proc(
        ["train.py", "--config", str(config), "--mesh", "meshes/cpu-8.yaml", "--no-progress"], procs.env()
    )
    saved = run_dir / "checkpoints" / "3"  # renamed into place only when complete
    procs.wait_until(saved.is_dir, 300, proc, "a complete checkpoint of step 3")
    proc.popen.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    logged = {row["step"]: row["loss"] for row in procs.train_rows(run_dir)}
    assert 3 <= max(logged) < STEPS, f"killed after steps {sorted(logged)}"
    assert all(loss == four.losses[step - 1] for step, loss in logged.items()), (logged, four.losses)

    run = four.run
    targets = abstract_state(run.model, run.tx, run.shardings)
    with Checkpointer(run_dir / "checkpoints", every=0, keep=2) as checkpointer:
        restored = restore_latest(
            checkpointer, lambda meta: restore_targets(*targets, meta, run.compression), fallback=False, log=print
        )
    step, params_R, opt_state, meta = restored
    assert (step, meta["data_position"], meta[REPLICAS]) == (3, 3, 4)
    _, _, losses = run_steps(run, (params_R, opt_state), token_batches(16)[step:], first_step=step + 1)
    assert list(losses) == list(four.losses[step:])  # bitwise


# --------------------------------------------------------------------------- what held-out evaluation scores


def test_held_out_loss_scores_the_outer_parameters(tmp_path, four):
    """Evaluated after steps 3, 6 and 9 (H = 4: outer steps after 4 and 8), the held-out loss is that of the
    anchor as of steps 0, 4 and 8, the network each outer step makes, on one device; not the replicas' mean
    1 to 3 inner steps into a period (what it was before), a network DiLoCo never produces."""
    cfg = diloco_config(tmp_path, eval_every=3, eval_batches=1, checkpoint={"every": 0})  # saved at the end only
    result = train(cfg, four.run.mesh, setup=four.run, progress=False, log=lambda _: None)
    _, after_4, _ = run_steps(four.run, four.run.init_state(), token_batches(16)[:4])
    anchors = {3: four.params0, 6: after_4["anchor"], 9: four.end[1]["anchor"]}
    expected = {step: held_out_loss(cfg, anchor) for step, anchor in anchors.items()}
    assert [s for s, _ in result.eval_losses] == [3, 6, 9]
    for step, loss in result.eval_losses:
        assert loss == pytest.approx(expected[step], rel=1e-5), (step, loss, expected[step])
    assert [(r["step"], r["anchor_step"]) for r in eval_rows(tmp_path)] == [(3, 0), (6, 4), (9, 8)]
    replicas_mean = held_out_loss(cfg, jax.tree.map(lambda p: np.mean(np.asarray(p), axis=0), four.end[0]))
    assert abs(replicas_mean - expected[9]) > 1e-3, "the check cannot tell the anchor from the replicas' mean"


# --------------------------------------------------------------------------- what is refused, and how


def test_every_composing_diloco_cell_names_the_test_that_runs_it():
    composing = {b if a == "diloco" else a for a, b in compat.composing_pairs() if "diloco" in (a, b)}
    assert set(compat.DILOCO_TESTS) == composing
    for test in compat.DILOCO_TESTS.values():
        name = test.split("[")[0]
        if "::" in name:  # another module's: path::function
            path, function = name.split("::")
            assert f"def {function}(" in pathlib.Path(path).read_text(), f"{name} is not a test"
        else:
            assert name in globals(), f"{name} is not a test here"


def test_a_checkpoint_of_another_replica_count_is_refused_in_one_line(four):
    targets = abstract_state(four.run.model, four.run.tx, four.run.shardings)
    for saved, what in [(2, "2 replica groups"), (None, "synchronous training's state")]:
        with pytest.raises(
            CheckpointError, match=f"checkpoint step 6 holds (the DiLoCo state of )?{what}, but this run"
        ):
            restore_targets(*targets, {"step": 6, REPLICAS: saved}, None)
