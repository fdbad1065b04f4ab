"""DiLoCo and local SGD (``shardlib.parallel.diloco``): against the paper's algorithm, in HLO, across a kill.

* H = 1 with local SGD (outer SGD at lr 1) and a linear inner optimizer is data
  parallelism: the same losses and parameters within 1e-5 (FSDP inside the replicas).
* H = 4 on data 4 matches DiLoCo written straight from the paper (Douillard et
  al. 2023, Algorithm 1): a loop over single-device replicas in plain JAX and
  optax, its outer Nesterov step by hand; so do tp, fsdp_tp, seq, accumulation,
  remat and fused attention inside the replicas (``compat.DILOCO_TESTS``).
* The compiled inner step has no collective over the replica axes; the outer
  step's all-reduces move 2(R-1)/R of the parameter bytes a device holds.
* A run killed in the middle of an outer period resumes bitwise.

Compilation dominates on 2 cores: one model initialisation serves every test
(``state_from``), the single-device reference step compiles once, the module's
setup compiles its steps once (``compiled``) and serves the paper check, the
HLO check and the kill trial.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import signal

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from shardlib.analysis.report.analytic import predict_terms
from shardlib.analysis.report.layout import resolve_layout
from shardlib.analysis.report.measure import abstract_batch, measure_compiled
from shardlib.models.layers import cross_entropy
from shardlib.parallel import compat
from shardlib.parallel.compat import IncompatibleFeatures
from shardlib.training.checkpoint import Checkpointer, CheckpointError, restore_latest
from shardlib.training.config import ConfigError, validate_config
from shardlib.training.data import load_token_splits
from shardlib.training.metrics import read_metrics
from shardlib.training.parallel_plan import outer_settings
from shardlib.training.setup import TrainingSetup, setup_training
from shardlib.training.state_layout import REPLICAS, restore_targets
from shardlib.training.train_state import abstract_state, make_optimizer
from shardlib.training.trainer import train
from tests import procs
from tests.support import assert_trees_close, mesh_of, tiny_config

STEPS, EVERY = 9, 4
LR, MOMENTUM = 0.7, 0.9


def diloco_config(run_dir="runs/test", *, outer=None, **overrides):
    """One layer, 16 x 16 tokens, 9 steps saved every 3: the outer steps fall at 4 and 8, saves mid-period."""
    raw = {
        "model": {"n_layers": 1},
        "steps": STEPS,
        "checkpoint": {"every": 3, "keep": 2},
        "eval_batches": 0,
        "outer": {"algorithm": "diloco", "inner_steps": EVERY, **(outer or {})},
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return tiny_config(run_dir, **raw)


def compiled(run: TrainingSetup) -> tuple[TrainingSetup, list, list]:
    """``run`` with its inner and outer steps compiled ahead (from abstract inputs), and their collectives."""
    params, opt_state = abstract_state(run.model, run.tx, run.shardings)
    with jax.set_mesh(run.mesh):
        inner = run.train_step.lower(params, opt_state, abstract_batch(run.cfg, run.batch_sharding)).compile()
        outers = tuple(o.lower(params, opt_state).compile() for o in run.outer_steps)
    inner_found = measure_compiled(inner, run.mesh).collectives
    outer_found = [c for o in outers for c in measure_compiled(o, run.mesh).collectives]  # every fragment's
    return dataclasses.replace(run, train_step=inner, outer_steps=outers), inner_found, outer_found


def local_param_bytes(run: TrainingSetup) -> int:
    """Bytes of one network as a device holds it inside its replica (the anchor's shards)."""
    leaves, shardings = jax.tree.leaves(run.model.params), jax.tree.leaves(run.shardings.opt_state["anchor"])
    return sum(math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize for p, s in zip(leaves, shardings, strict=True))


@functools.cache
def token_batches(batch_size: int, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """The first ``steps`` batches of the stdlib corpus, as every run here sees them."""
    tokens, _ = load_token_splits(tiny_config().data)
    loader = setup_training(tiny_config(batch_size=batch_size), mesh_of(devices=1)).loader(tokens, seed=0)
    return [{k: np.asarray(v) for k, v in loader.next().items()} for _ in range(steps)]


def run_steps(run: TrainingSetup, state, batches, first_step: int = 1):
    """The training loop's step order (the outer step after every H-th); the per-step mean losses."""
    params, opt_state = state
    losses = []
    for step, batch in enumerate(batches, start=first_step):
        placed = {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}
        params, opt_state, metrics = run.train_step_for(step)(params, opt_state, placed)
        if run.outer_due(step):
            params, opt_state = run.outer_step_after(step)(params, opt_state)
        losses.append(float(run.scalar_metrics([metrics])[0]["loss"]))
    return params, opt_state, np.array(losses)


# --------------------------------------------------------------------------- the paper's algorithm


def one_device(cfg):
    """``cfg`` as one network on one device: no replicas, no strategy inside them."""
    clean = cfg.model_copy(
        update={"grad_accum": 1, "attention": type(cfg.attention)(), "outer": type(cfg.outer)(), "sharding": "dp"}
    )
    return clean.model_copy(update={"model": cfg.model.model_copy(update={"remat": "none"})})


@functools.cache
def _model_loss(cfg_json: str):
    """(params, inputs, targets) -> the model's loss on one device: plain JAX, no mesh."""
    cfg = tiny_config().model_validate_json(cfg_json)
    model = setup_training(cfg, mesh_of(devices=1)).model

    def loss_fn(params, inputs, targets):
        logits, _, _ = nnx.merge(model.graphdef, params).forward(inputs)
        return cross_entropy(logits, targets)

    return model, loss_fn


@functools.cache
def _inner_step(cfg_json: str):
    """One replica's inner step on one device: plain autodiff of the model's loss, then the run's AdamW."""
    cfg = tiny_config().model_validate_json(cfg_json)
    model, loss_fn = _model_loss(cfg_json)
    inner = make_optimizer(cfg.optimizer, cfg.steps, model.logical_axes)

    @jax.jit
    def step(params, state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, state = inner.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step, inner


def paper_diloco(
    cfg,
    params0,
    batches,
    rows,
    *,
    every,
    lr=LR,
    momentum=MOMENTUM,
    fragments=None,
    overlap=0,
    mixing=0.0,
    moments="none",
):
    """DiLoCo (Douillard et al. 2023, Algorithm 1) on ``len(rows)`` single-device replicas.

    rows[r]: the batch rows replica r trains on. Each replica starts every period
    from the anchor and keeps its own AdamW state across periods; every
    ``every`` steps the pseudo-gradient is averaged and an outer SGD step with
    Nesterov momentum moves the anchor: m <- mu m + delta; anchor -= lr (delta + mu m).

    ``fragments`` (streaming DiLoCo, Douillard et al. 2025): F dicts, leaf path -> the (start, stop)
    rows of its leading dimension in that fragment. Fragment f's outer step, the same update on
    its rows only, follows steps (f + 1) H/F, (f + 1) H/F + H, ... ``overlap`` (tau, 0 or 1): the
    pseudo-gradient taken after such a step lands tau steps later, where each replica keeps ``mixing``
    (alpha) of its own rows and takes 1 - alpha of the new anchor's. ``moments`` (``first``: mu,
    ``both``: mu and nu): the replicas' AdamW moments averaged at each outer step, on its rows.
    Returns (per-step mean loss, anchor, replicas' parameters).
    """
    step, inner = _inner_step(one_device(cfg).model_dump_json())
    host = functools.partial(jax.tree.map, lambda x: np.asarray(x, np.float32))
    anchor, trace = host(params0), jax.tree.map(np.zeros_like, host(params0))
    replicas = [anchor] * len(rows)
    states = [inner.init(params0) for _ in rows]
    losses, pending = [], None
    for t, batch in enumerate(batches, start=1):
        step_losses = []
        for r, take in enumerate(rows):
            replicas[r], states[r], loss = step(replicas[r], states[r], batch["inputs"][take], batch["targets"][take])
            step_losses.append(float(loss))
        losses.append(np.mean(step_losses))
        if pending is not None:  # taken after the previous step, landing now
            anchor, trace, replicas = _paper_fragment_step(anchor, trace, replicas, *pending, lr, momentum, mixing)
            pending = None
        if fragments is not None:
            stride = every // len(fragments)
            if t % stride == 0:
                part = fragments[(t // stride - 1) % len(fragments)]
                pending = (part, _paper_fragment_delta(anchor, replicas, part))
                if not overlap:
                    anchor, trace, replicas = _paper_fragment_step(
                        anchor, trace, replicas, *pending, lr, momentum, mixing
                    )
                    states = _paper_average_moments(states, moments, part)
                    pending = None
        elif t % every == 0:
            delta = jax.tree.map(lambda a, *ps: np.mean([a - np.asarray(p) for p in ps], axis=0), anchor, *replicas)
            trace = jax.tree.map(lambda m, d: momentum * m + d, trace, delta)
            anchor = jax.tree.map(lambda a, d, m: a - lr * (d + momentum * m), anchor, delta, trace)
            replicas = [anchor] * len(rows)
            states = _paper_average_moments(states, moments)
    return np.array(losses), anchor, host(replicas)


def _paths(tree) -> dict:
    return {jax.tree_util.keystr(k): k for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _paper_average_moments(states, moments, part=None):
    """Every replica's AdamW mu (``first``) or mu and nu (``both``) set to their mean over the replicas, on
    ``part``'s rows (leaf path -> (start, stop); None: every leaf whole)."""
    names = {"none": (), "first": ("mu",), "both": ("mu", "nu")}[moments]
    if not names:
        return states

    def is_adam(node):
        return isinstance(node, optax.ScaleByAdamState)

    flats = [jax.tree.flatten(s, is_leaf=is_adam) for s in states]
    for k, node in enumerate(flats[0][0]):
        if not is_adam(node):
            continue
        for name in names:
            trees = [jax.tree.map(lambda x: np.array(x, np.float32), getattr(f[0][k], name)) for f in flats]
            paths = _paths(trees[0])
            for leaf, (start, stop) in (part or dict.fromkeys(paths, (None, None))).items():
                xs = [_at(t, paths[leaf]) for t in trees]
                cut = ... if xs[0].ndim == 0 else slice(start, stop)
                mean = np.mean([x[cut] for x in xs], axis=0)
                for x in xs:
                    x[cut] = mean
            for f, t in zip(flats, trees, strict=True):
                f[0][k] = f[0][k]._replace(**{name: t})
    return [jax.tree.unflatten(treedef, leaves) for leaves, treedef in flats]


def _paper_fragment_delta(anchor, replicas, part) -> dict:
    """The fragment's pseudo-gradient, leaf path -> the replicas' mean of anchor - replica on its rows."""
    flat = _paths(anchor)
    return {
        name: np.mean([_at(anchor, flat[name])[a:b] - np.asarray(_at(r, flat[name]))[a:b] for r in replicas], axis=0)
        for name, (a, b) in part.items()
    }


def _paper_fragment_step(anchor, trace, replicas, part, delta, lr, momentum, mixing=0.0):
    """One fragment's outer step by ``delta``, element by element on its rows; everything else as it was."""
    anchor, trace = jax.tree.map(np.copy, anchor), jax.tree.map(np.copy, trace)
    replicas = [jax.tree.map(lambda x: np.array(x, np.float32), r) for r in replicas]
    flat = _paths(anchor)
    for name, (start, stop) in part.items():
        a = _at(anchor, flat[name])
        t = _at(trace, flat[name])
        t[start:stop] = momentum * t[start:stop] + delta[name]
        a[start:stop] -= lr * (delta[name] + momentum * t[start:stop])
        for p in (_at(r, flat[name]) for r in replicas):
            p[start:stop] = mixing * p[start:stop] + (1 - mixing) * a[start:stop] if mixing else a[start:stop]
    return anchor, trace, replicas


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def contiguous_rows(batch_size: int, replicas: int) -> list[np.ndarray]:
    """Replicas over `data`, the batch's only split axis: replica r holds the r-th block of rows."""
    return list(np.arange(batch_size).reshape(replicas, -1))


def assert_matches_paper(run, params_R, opt_state, losses, ref):
    """Per-step losses, the anchor and every replica's parameters within 1e-5 (relative, per leaf)."""
    ref_losses, ref_anchor, ref_replicas = ref
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(jax.device_get(opt_state["anchor"]), ref_anchor, what="anchor")
    stacked = jax.tree.map(lambda *ps: np.stack(ps), *ref_replicas)
    assert_trees_close(jax.device_get(params_R), stacked, what="replica parameters")


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


@functools.cache
def _held_out_loss_fn(cfg_json: str):
    cfg = tiny_config().model_validate_json(cfg_json)
    _, loss_fn = _model_loss(one_device(cfg).model_dump_json())
    _, heldout = load_token_splits(cfg.data)
    loader = setup_training(one_device(cfg), mesh_of(devices=1)).loader(heldout, seed=cfg.seed + 1)
    batches = [{k: np.asarray(v) for k, v in loader.peek(i).items()} for i in range(cfg.eval_batches)]
    loss = jax.jit(loss_fn)
    return lambda params: float(np.mean([loss(params, b["inputs"], b["targets"]) for b in batches]))


def held_out_loss(cfg, params) -> float:
    """The loss of one network ``params`` on one device, over the held-out batches ``train`` evaluates."""
    return _held_out_loss_fn(cfg.model_dump_json())(jax.device_get(params))


def eval_rows(run_dir: pathlib.Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]


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


@pytest.mark.parametrize(
    ("sharding", "axes", "sizes"), [("fsdp", ["data"], {"data": 2}), ("fsdp_tp", ["data", "expert"], {"data": 2})]
)
def test_fsdp_with_nothing_left_to_shard_over_is_refused_by_the_table(sharding, axes, sizes):
    cfg = diloco_config(sharding=sharding, outer={"replica_axes": axes})
    with pytest.raises(IncompatibleFeatures) as err:
        setup_training(cfg, mesh_of(**sizes))
    assert compat.REFUSED_WHEN[(sharding, "diloco")][1] in str(err.value)
    assert "outer.algorithm=diloco (outer.replica_axes=" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("outer", "message"),
    [
        ({"algorithm": "local_sgd", "learning_rate": 0.5}, "outer: local_sgd averages the replicas"),
        ({"algorithm": "diloco", "inner_steps": 0}, "outer.inner_steps: Input should be greater than 0"),
        (
            {"algorithm": "diloco", "replica_axes": ["model"]},
            "outer.replica_axes.0: Input should be 'data', 'data_replica' or 'expert'",
        ),
        ({"algorithm": "diloco", "replica_axes": []}, "outer: Value error, replica_axes must name each mesh axis once"),
        ({"algorithm": "diloco", "compression": "fp8"}, "outer.compression: Input should be 'none', 'bf16' or 'int8'"),
        ({"algorithm": "diloco", "inner_steps": 4, "fragments": 3}, "outer: Value error, fragments=3 must divide"),
        (
            {"algorithm": "diloco", "overlap_steps": 1, "average_moments": "first"},
            "outer: Value error, average_moments with overlap_steps=1 is not built",
        ),
        (
            {"algorithm": "diloco", "overlap_steps": 2},
            "outer.overlap_steps: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_outer_settings_name_their_key(outer, message):
    raw = tiny_config().model_dump(mode="json") | {"outer": outer}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert message.replace("Value error, ", "") in str(err.value)


@pytest.mark.parametrize("moments", ["first", "both"])
def test_averaging_the_moments_of_an_optimizer_without_them_is_refused(moments):
    """optax.sgd keeps no Adam moments: averaging them would do nothing, without a word."""
    cfg = diloco_config(outer={"average_moments": moments})
    with pytest.raises(ValueError, match=rf"outer.average_moments={moments} averages the inner optimizer's Adam"):
        setup_training(cfg, mesh_of(data=4), optimizer=optax.sgd(0.1, momentum=0.9))
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))  # found inside a chain
    assert setup_training(cfg, mesh_of(data=4), optimizer=adam).plan.outer.settings.moments == moments


def test_an_overlapped_run_keeps_half_of_each_replicas_overlapped_step():
    """outer.mixing unset under overlap_steps 1 reaches the strategy as the paper's alpha (test_config)."""
    cfg = diloco_config(outer={"overlap_steps": 1})
    assert outer_settings(cfg).mixing == 0.5
    assert outer_settings(diloco_config(outer={"overlap_steps": 1, "mixing": 0.0})).mixing == 0.0


def test_a_checkpoint_of_another_replica_count_is_refused_in_one_line(four):
    targets = abstract_state(four.run.model, four.run.tx, four.run.shardings)
    for saved, what in [(2, "2 replica groups"), (None, "synchronous training's state")]:
        with pytest.raises(
            CheckpointError, match=f"checkpoint step 6 holds (the DiLoCo state of )?{what}, but this run"
        ):
            restore_targets(*targets, {"step": 6, REPLICAS: saved}, None)
