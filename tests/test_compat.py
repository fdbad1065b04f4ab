"""The compatibility matrix, walked whole.

* Every pair of features has a cell, and the printed table shows them all.
* Every refused cell is refused, by ``setup_training``, with the table's reason.
* Every composing cell runs one train step on emulated devices, the step users run
  (its compressed reduction, its per-use reduction, its pipeline), and matches one
  device: the loss within 1e-5 and the gradients the step applied relative to each
  leaf's scale; bfloat16 compute is held to float32 by the one-device bfloat16 run's
  own error, tightly enough that gradients 1% off fail. Pipelined cells also check
  that the eval step sees the network the train step trains (the same loss on the
  same batch and weights).

A feature added to ``shardlib.parallel.compat.FEATURES`` without cells, or a cell
that says "composes" for a pair that does not, fails here.
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import optax
import pytest
from scipy.optimize import LinearConstraint, milp

from shardlib.parallel import compat
from shardlib.parallel.compat import IncompatibleFeatures
from shardlib.training.setup import TrainingSetup, setup_training
from tests.support import (
    SAME_LOSS_REL,
    assert_trees_close,
    assert_trees_within_rounding,
    mesh_of,
    shared_result,
    tiny_config,
)

# feature -> (config overrides, mesh axis sizes it needs)
_MOE = {"n_experts": 4, "top_k": 2, "capacity_factor": 4.0, "period": 2}  # capacity >= every token: no drops
MOE_KINDS = ("moe", "dropless")  # the two expert dispatches
FEATURE_SETUP: dict[str, tuple[dict, dict]] = {
    "dp": ({"sharding": "dp"}, {"data": 2}),
    "fsdp": ({"sharding": "fsdp"}, {"data": 2}),
    "tp": ({"sharding": "tp"}, {"model": 2}),
    "fsdp_tp": ({"sharding": "fsdp_tp"}, {"data": 2, "model": 2}),
    "hsdp": ({}, {"data_replica": 2}),
    "pipeline": ({"pipeline": {"schedule": "1f1b", "microbatches": 4}}, {"pipe": 2}),
    "interleaved": (
        {"pipeline": {"schedule": "interleaved-1f1b", "microbatches": 4, "virtual_stages": 2}, "model.n_layers": 4},
        {"pipe": 2},
    ),
    "zero-bubble": ({"pipeline": {"schedule": "zb-h1", "microbatches": 4}}, {"pipe": 2}),
    "zero-bubble-v": (
        {"pipeline": {"schedule": "zb-v", "microbatches": 4, "virtual_stages": 2}, "model.n_layers": 4},
        {"pipe": 2},
    ),
    "seq": ({}, {"seq": 2}),
    "ring": ({"attention": {"impl": "ring"}}, {"seq": 2}),
    "allgather": ({"attention": {"impl": "allgather"}}, {"seq": 2}),
    "ulysses": ({"attention": {"impl": "ulysses"}}, {"seq": 2}),
    "fused": ({"attention": {"impl": "fused"}}, {}),
    "moe": ({"model.moe": _MOE}, {"expert": 2}),
    "dropless": ({"model.moe": {**_MOE, "capacity_factor": 1.0, "dispatch": "dropless"}}, {"expert": 2}),
    "compression": ({"grad_compression": "bf16"}, {"data": 2}),
    "accumulation": ({"grad_accum": 2}, {}),
    "remat": ({"model.remat": "full"}, {}),
    "bf16": ({"model.compute_dtype": "bfloat16"}, {}),
    "multiprocess": ({}, {}),
    "diloco": ({"outer": {"algorithm": "diloco", "inner_steps": 2}}, {"data": 2}),
}
IMPLIED = {"ring": ("seq",), "allgather": ("seq",), "ulysses": ("seq",)}  # their setups split the sequence
# Its cells run in tests/test_multiprocess_cells.py: 2 processes x 4 devices, the same cover and
# reference as here.
MULTIPROCESS = "multiprocess"
# A DiLoCo run is not one gradient to hold against one device: its composing cells run against the
# DiLoCo algorithm itself in tests/test_diloco.py (which test covers which: compat.DILOCO_TESTS).
DILOCO = "diloco"
BATCH, SEQ = 16, 16  # 16 rows: a pipeline's 4 microbatches still split over 4 data devices (hsdp x dp)


def _config(features: tuple[str, ...], *, only: bool = False):
    """(raw config, mesh sizes) turning ``features`` on; ``only``: no mesh axis a feature does not name
    (ring attention over a one-device seq axis), so that no other feature turns on."""
    raw: dict = {"batch_size": BATCH, "seq_len": SEQ, "model": {"n_layers": 2}}
    sizes: dict[str, int] = {}
    for name in features:
        overrides, need = FEATURE_SETUP[name]
        if only and name in IMPLIED:
            need = {}
        for key, value in overrides.items():
            if key.startswith("model."):
                raw["model"][key.removeprefix("model.")] = value
            else:
                raw[key] = value
        for axis, n in need.items():
            sizes[axis] = max(sizes.get(axis, 1), n)
    if "bf16" in features and set(features) & set(MOE_KINDS):
        # Every token to both of 2 experts: bfloat16 rounding can flip a token's top-2 of 4 experts, a
        # discontinuity no rounding allowance covers (dp+pipeline+moe+bf16 on 4 experts: 5% off; on 2: within).
        raw["model"]["moe"] = {**raw["model"]["moe"], "n_experts": 2}
    if set(features) & set(MOE_KINDS) and set(features) & set(compat.PIPELINE_KINDS):
        raw["model"]["n_layers"] = 4  # each of 2 stages holds a whole group: a dense layer and an MoE layer
    sizes.setdefault("data", 1)
    return raw, sizes


def _cfg(raw: dict, **extra):
    raw = {**raw, **extra}
    model = raw.pop("model")
    return tiny_config(model=model, **raw)


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (BATCH, SEQ + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _placed(run, batch):
    return {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}


# A cell's gradients are its train step's (the compressed reduction, the per-use reduction, the
# pipeline's executor: whatever the step users run takes), read off one update of plain SGD:
# after = before - SGD_LR * grads. A power of two makes the scaling exact, and a large one makes
# the update swamp the rounding of the parameters it is added to (at lr 1 a norm weight of 1
# rounds a 1e-3 gradient to 6e-8 / 1e-3 = 6e-5 of itself, above fp32 agreement).
SGD_LR = 2.0**16


def sgd_setup(cfg, mesh) -> TrainingSetup:
    """The run of ``cfg`` on ``mesh``, its optimizer plain SGD at ``SGD_LR`` (``faults.nan_policy`` still wraps it)."""
    return setup_training(cfg, mesh, optimizer=optax.sgd(SGD_LR))


def gradients_of_update(before, after):
    """The gradients an SGD step at ``SGD_LR`` applied, from the parameters before and after it (host trees)."""
    return jax.tree.map(lambda b, a: (np.asarray(b, np.float64) - np.asarray(a, np.float64)) / SGD_LR, before, after)


def _model_key(model: dict) -> tuple:
    return tuple(sorted({**model, "moe": tuple(sorted(model["moe"].items()))}.items()))


def reference(cfg, combo: tuple[str, ...], compute_dtype: str = "float32"):
    """(loss, grads) of ``cfg``'s model on one device in ``compute_dtype``: the model alone, no strategy.

    No remat (a strategy: its cells are held to the network without it), but MoE's auxiliary losses
    over as many microbatches as the run takes them on (``compat.NOTES``): a pipeline's, or
    ``grad_accum``'s.
    """
    pipelined = bool(set(combo) & set(compat.PIPELINE_KINDS))
    splits = (cfg.pipeline.microbatches if pipelined else cfg.grad_accum) if set(combo) & set(MOE_KINDS) else 1
    model = {**cfg.model.model_dump(), "remat": "none", "compute_dtype": compute_dtype}
    return _reference(_model_key(model), splits)


@functools.cache
def _reference(model_key: tuple, splits: int):
    return shared_result(
        ("test_compat.reference", model_key, splits, BATCH, SEQ), lambda: _one_device(model_key, splits)
    )


def _one_device(model_key: tuple, splits: int) -> tuple[float, dict]:
    model = dict(model_key)
    model["moe"] = dict(model["moe"])
    cfg = tiny_config(model=model, batch_size=BATCH, seq_len=SEQ, grad_accum=splits)
    run = setup_training(cfg, mesh_of(devices=1))
    params, _ = run.init_state()
    loss, grads = run.grads(params, _placed(run, _batch(cfg.model.vocab_size)))
    return float(loss), jax.device_get(grads)


def step_outputs(run: TrainingSetup, batch, fetch=jax.device_get) -> tuple[float, dict, float | None]:
    """(loss, gradients in logical layer order, the eval step's loss or None) of one train step from fresh
    state on ``batch`` (placed): ``run`` is an ``sgd_setup``. The eval step (pipelines only) sees the
    same weights, before the step takes them (it donates its inputs). ``fetch``: device tree -> host
    tree (a multi-process run's gathers across processes)."""
    params, opt_state = run.init_state()  # fresh: the compressed path's residuals start at zero
    eval_loss = float(fetch(run.eval_step(params, batch))) if run.plan.pipeline is not None else None
    before = fetch(params)
    after, _, metrics = run.train_step(params, opt_state, batch)
    after, loss = fetch((after, metrics["loss"]))
    return float(loss), run.plan.sequential_params(gradients_of_update(before, after)), eval_loss


def test_every_pair_has_a_cell_and_the_table_prints():
    for a, b in itertools.combinations(compat.NAMES, 2):
        assert compat.cell(a, b).status in ("composes", "refused", "exclusive")
    text = compat.format_matrix()
    for i, name in enumerate(compat.NAMES):
        assert f"{name:<{max(map(len, compat.NAMES))}} {i:>2} " in text
    for (a, b), why in (compat.REFUSED | compat.NOTES).items():
        assert f"{a} x {b}: {why}" in text
    for a, b in compat.NOTES:
        assert compat.cell(a, b).status == "composes"
    assert set(FEATURE_SETUP) == set(compat.NAMES), "a feature without a test setup"


REFUSED = [pair for pair in itertools.combinations(compat.NAMES, 2) if compat.cell(*pair).status == "refused"]


@pytest.mark.parametrize("pair", REFUSED, ids="-x-".join)
def test_refused_cells_are_refused_with_the_tables_reason(pair):
    raw, sizes = _config(pair, only=True)
    with pytest.raises(IncompatibleFeatures) as err:
        setup_training(_cfg(raw), mesh_of(**sizes))
    assert compat.cell(*pair).why in str(err.value)
    assert "\n" not in str(err.value)


# Composing cells are run in combinations: one sharded run with several features on checks
# every pair among them, so a cover of the table's composing pairs needs a quarter as many runs
# as there are pairs. bfloat16 compute and compressed gradients agree only to their rounding, so a
# run with either one is credited only for the pairs that contain it (see ``credited``); every
# other pair is held to fp32.
LOOSE = ("bf16", "compression")
MAX_DEVICES = 8


def _closure(features) -> frozenset[str]:
    out = set(features)
    for name in features:
        out.update(IMPLIED.get(name, ()))
    return frozenset(out)


def _runnable(combo) -> bool:
    composes = all(compat.cell(a, b).status == "composes" for a, b in itertools.combinations(sorted(combo), 2))
    return composes and _devices(combo) <= MAX_DEVICES


def _devices(combo) -> int:
    return int(np.prod(list(_config(tuple(combo))[1].values())))


def credited(combo) -> set[frozenset[str]]:
    """The pairs a run of ``combo`` checks at its tolerance.

    A preset's pair with a loose feature is credited only outside a pipeline: a pipeline's executor
    reduces the gradients itself, so the presets' own reduction (per weight use, under bfloat16
    compute on ``configs/1b.yaml``'s path) runs only without one.
    """
    loose = set(combo) & set(LOOSE)
    pairs = {frozenset(p) for p in itertools.combinations(sorted(combo), 2) if not loose or set(p) & loose}
    if set(combo) & set(compat.PIPELINE_KINDS):
        pairs -= {frozenset((preset, name)) for preset in compat.PRESETS for name in LOOSE}
    return pairs


# What a run costs, estimated to weigh the cover: CPU seconds of its compiles (initialisation, train
# step, a pipeline's eval step), a base plus each feature's extra, measured one at a time beside dp
# and beside dp with a pipeline (docs/tests.md): a pipeline's executor traces its stage once per
# tick, so ring attention or experts inside one cost five times what they cost outside. A feature
# not listed is priced at NEW_FEATURE_COST_S until measured.
RUN_COST_S = 1.8
FEATURE_COST_S: dict[str, tuple[float, float]] = {  # name: (extra without a pipeline, extra inside one)
    **dict.fromkeys(("dp", "fsdp", "fsdp_tp", "hsdp", "seq", "allgather", "remat", "multiprocess"), (0.05, 0.3)),
    **dict.fromkeys(compat.PIPELINE_KINDS, (2.5, 2.5)),
    "tp": (0.05, 0.5),
    "fused": (0.05, 0.5),
    "ring": (1.2, 7.3),
    "moe": (1.8, 6.7),
    "accumulation": (0.5, 0.5),
    "compression": (0.4, 0.4),
    "bf16": (0.1, 0.1),
}
NEW_FEATURE_COST_S = (1.0, 3.0)


def run_cost(combo) -> float:
    """The estimated CPU seconds of one run of ``combo``: ``RUN_COST_S`` and its features' ``FEATURE_COST_S``."""
    inside = int(bool(set(combo) & set(compat.PIPELINE_KINDS)))
    names = sorted(combo)  # one order of summation: every xdist worker must collect the same cover
    return RUN_COST_S + sum(FEATURE_COST_S.get(name, NEW_FEATURE_COST_S)[inside] for name in names)


def _candidates(names: list[str]) -> list[frozenset[str]]:
    """Every runnable combination of ``names`` closed under ``IMPLIED``, depth first (a combination
    that does not run has no superset that runs: cells and device counts only add up)."""
    found: list[frozenset[str]] = []

    def grow(start: int, combo: frozenset[str]) -> None:
        for i in range(start, len(names)):
            bigger = combo | {names[i]}
            fits = all(compat.cell(names[i], other).status == "composes" for other in combo)
            if fits and _devices(bigger) <= MAX_DEVICES:
                found.append(bigger)
                grow(i + 1, bigger)

    grow(0, frozenset())
    return [c for c in found if _closure(c) == c]


def cover(pairs) -> list[tuple[str, ...]]:
    """Feature combinations whose runs check every pair in ``pairs`` at the least total ``run_cost``.

    An exact weighted set cover (scipy's MILP, HiGHS) over every runnable combination of the features
    the pairs name; a combination without a preset where ``dp`` fits beside it is run as ``dp``'s
    (the default preset), so only that one is weighed. Deterministic; sorted in ``compat.NAMES`` order.
    """
    rows = sorted(pairs, key=lambda p: sorted(compat.NAMES.index(x) for x in p))
    names = [n for n in compat.NAMES if any(n in p for p in rows)]
    options = []
    for combo in _candidates(names):
        if not combo & set(compat.PRESETS) and _runnable(combo | {"dp"}):
            continue
        if checks := credited(combo) & set(rows):
            options.append((combo, checks))
    covers = np.array([[pair in checks for _, checks in options] for pair in rows], dtype=float)
    costs = np.array([run_cost(combo) for combo, _ in options])
    result = milp(costs, constraints=LinearConstraint(covers, lb=1), integrality=np.ones(len(options)), bounds=(0, 1))
    assert result.success, f"no cover of {len(rows)} pairs: {result.message}"
    chosen = [tuple(sorted(options[i][0], key=compat.NAMES.index)) for i in np.flatnonzero(result.x > 0.5)]
    return sorted(chosen, key=lambda c: [compat.NAMES.index(x) for x in c])


COMPOSING = {frozenset(p) for p in compat.composing_pairs() if MULTIPROCESS not in p and DILOCO not in p}
COMBOS = cover(COMPOSING)


def test_the_runs_below_cover_every_composing_cell():
    checked = set().union(*(credited(c) for c in COMBOS))
    assert COMPOSING <= checked, sorted(tuple(sorted(p)) for p in COMPOSING - checked)
    assert all(_runnable(c) for c in COMBOS)


# Compressed gradients are rounded twice to bfloat16 on their way (compression.compressed_mean):
# each rounding is within 2^-9 of the value, so the mean is within 2^-8 of the leaf's scale.
BF16_ROUNDING = 2.0**-8
# bfloat16 compute is held to the float32 reference: every gradient leaf may be BF16_TIMES as far
# from it as the one-device bfloat16 run's (tests.support.assert_trees_within_rounding). A sharded
# run rounds in another order, another draw of the same error (0.3-1% of a dense leaf, 5% of an
# expert's; measured 0.8-1.4 times the one-device run's), while a systematic error adds its own:
# gradients 1% too large fail every bf16 cell (the cells check that they do). Compressed
# gradients' two roundings (0.2% of a leaf) lie inside that allowance. The loss (float32 cross-
# entropy of bfloat16 logits) agrees within 1e-5 relative; BF16_LOSS_REL allows ten times that.
BF16_TIMES = 2.0
BF16_LOSS_REL = 1e-4
WRONG_BY = 1.01  # a systematic error the bf16 cells must resolve


def eval_tolerance(combo: tuple[str, ...], loss: float) -> float:
    """How far the eval step's loss may be from the train step's ``loss`` on the same batch: the
    same network in sequence, so only summation order separates them: bf16 compute's rounding,
    or in fp32 a few ulps (``tests.support.SAME_LOSS_REL`` of the loss)."""
    return (BF16_LOSS_REL if "bf16" in combo else SAME_LOSS_REL) * abs(loss)


def assert_cell_matches_one_device(combo, cfg, loss: float, grads, eval_loss: float | None = None) -> None:
    """A cell's train step (its loss, gradients in logical layer order, the eval step's loss) against one device.

    fp32: the loss within 1e-5, every gradient within 1e-5 of its leaf's scale; compressed gradients
    within two bfloat16 roundings of it. bfloat16 compute: against the float32 reference too, each
    leaf up to ``BF16_TIMES`` the one-device bfloat16 run's distance from it, and the same gradients
    ``WRONG_BY`` too large must fail that.
    """
    ref_loss, ref_grads = reference(cfg, combo)
    if "bf16" in combo:
        bf16_loss, bf16_grads = reference(cfg, combo, "bfloat16")
        assert abs(loss - ref_loss) <= BF16_TIMES * abs(bf16_loss - ref_loss) + BF16_LOSS_REL * abs(ref_loss), (
            loss,
            ref_loss,
            bf16_loss,
        )

        def check(g):
            assert_trees_within_rounding(g, ref_grads, bf16_grads, times=BF16_TIMES, rel=1e-5, what="gradient")

        check(grads)
        with pytest.raises(AssertionError):  # the check resolves a small systematic error
            check(jax.tree.map(lambda g: WRONG_BY * g, grads))
    else:
        assert abs(loss - ref_loss) <= 1e-5, (loss, ref_loss)
        rel = 2 * BF16_ROUNDING if "compression" in combo else 1e-5
        assert_trees_close(grads, ref_grads, rel=rel, what="gradient")
    if eval_loss is not None:
        assert abs(eval_loss - loss) <= eval_tolerance(combo, loss), "eval runs another network"


def active_features(combo) -> set[str]:
    """The features a run of ``combo`` has on: ``combo``'s, and the default preset dp where it names none
    (a run no preset's setup fits beside: more than 8 devices with dp's data 2)."""
    return set(combo) | (set() if set(combo) & set(compat.PRESETS) else {"dp"})


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_composing_features_match_one_device(combo):
    raw, sizes = _config(combo)
    cfg = _cfg(raw)
    run = sgd_setup(cfg, mesh_of(**sizes))
    assert set(run.plan.active_features()) == active_features(combo)
    assert_cell_matches_one_device(combo, cfg, *step_outputs(run, _placed(run, _batch(cfg.model.vocab_size))))
