"""The compatibility matrix, walked whole.

* Every pair of features has a cell, and the printed table shows them all.
* Every refused cell is refused, by ``setup_training``, with the table's reason.
* Every composing cell runs on emulated devices and matches one device:
  the loss within 1e-5 and every gradient relative to its leaf's scale.
  Pipelined cells also check that the eval step sees the network the train
  step trains (the same loss on the same batch and weights).

A feature added to ``shardlib.parallel.compat.FEATURES`` without cells, or a cell
that says "composes" for a pair that does not, fails here.
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest

from shardlib.parallel import compat
from shardlib.parallel.compat import IncompatibleFeatures
from shardlib.training.setup import setup_training
from tests.support import SAME_LOSS_REL, assert_trees_close, mesh_of, tiny_config

# feature -> (config overrides, mesh axis sizes it needs)
_MOE = {"n_experts": 4, "top_k": 2, "capacity_factor": 4.0, "period": 2}  # capacity >= every token: no drops
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
    "fused": ({"attention": {"impl": "fused"}}, {}),
    "moe": ({"model.moe": _MOE}, {"expert": 2}),
    "compression": ({"grad_compression": "bf16"}, {"data": 2}),
    "accumulation": ({"grad_accum": 2}, {}),
    "remat": ({"model.remat": "full"}, {}),
    "bf16": ({"model.compute_dtype": "bfloat16"}, {}),
    "multiprocess": ({}, {}),
    "diloco": ({"outer": {"algorithm": "diloco", "inner_steps": 2}}, {"data": 2}),
}
IMPLIED = {"ring": ("seq",), "allgather": ("seq",)}  # their setups split the sequence
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
    if "moe" in features and set(features) & set(compat.PIPELINE_KINDS):
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


@functools.cache
def _reference(model_key: tuple, grad_accum: int = 1):
    """(loss, grads) on one device: the model alone, no strategy (but ``grad_accum``, see ``compat.NOTES``)."""
    model = dict(model_key)
    model["moe"] = dict(model["moe"])
    cfg = tiny_config(model=model, batch_size=BATCH, seq_len=SEQ, grad_accum=grad_accum)
    run = setup_training(cfg, mesh_of(devices=1))
    params, _ = run.init_state()
    loss, grads = run.grads(params, _placed(run, _batch(cfg.model.vocab_size)))
    return float(loss), jax.device_get(grads)


def _placed(run, batch):
    return {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}


def _model_key(cfg) -> tuple:
    model = cfg.model.model_dump()
    model["moe"] = tuple(sorted(model["moe"].items()))
    return tuple(sorted(model.items()))


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
# every pair among them, so a greedy cover of the table's pairs needs two dozen compiles, not
# eighty. bfloat16 compute and compressed gradients agree only to their rounding, so a run with
# either one is credited only for the pairs that contain it; every other pair is held to fp32.
LOOSE = ("bf16", "compression")
MAX_DEVICES = 8


def _closure(features) -> frozenset[str]:
    out = set(features)
    for name in features:
        out.update(IMPLIED.get(name, ()))
    return frozenset(out)


def _runnable(combo) -> bool:
    composes = all(compat.cell(a, b).status == "composes" for a, b in itertools.combinations(sorted(combo), 2))
    return composes and np.prod(list(_config(tuple(combo))[1].values())) <= MAX_DEVICES


def credited(combo) -> set[frozenset[str]]:
    """The pairs a run of ``combo`` checks at its tolerance."""
    loose = set(combo) & set(LOOSE)
    return {frozenset(p) for p in itertools.combinations(sorted(combo), 2) if not loose or set(p) & loose}


def cover(pairs) -> list[tuple[str, ...]]:
    """Feature combinations whose runs check every pair in ``pairs`` (greedy, deterministic)."""
    order = list(compat.NAMES)
    addable = [n for n in order if n not in (MULTIPROCESS, DILOCO, *LOOSE)]  # a run is given those, never adds them
    uncovered, combos = set(pairs), []
    while uncovered:
        combo = _closure(min(uncovered, key=lambda p: sorted(order.index(x) for x in p)))
        while True:
            options = [_closure(combo | {f}) for f in addable if f not in combo]
            options = [c for c in options if _runnable(c)]
            gains = [len(credited(c) & uncovered) - len(credited(combo) & uncovered) for c in options]
            if not gains or max(gains) <= 0:
                break
            combo = options[gains.index(max(gains))]
        if not set(combo) & set(compat.PRESETS) and _runnable(combo | {"dp"}):
            combo = combo | {"dp"}
        uncovered -= credited(combo)
        combos.append(tuple(sorted(combo, key=order.index)))
    return combos


COMPOSING = {frozenset(p) for p in compat.composing_pairs() if MULTIPROCESS not in p and DILOCO not in p}
COMBOS = cover(COMPOSING)


def test_the_runs_below_cover_every_composing_cell():
    checked = set().union(*(credited(c) for c in COMBOS))
    assert COMPOSING <= checked, sorted(tuple(sorted(p)) for p in COMPOSING - checked)
    assert all(_runnable(c) for c in COMBOS)


# Compressed gradients are rounded twice to bfloat16 on their way (compression.compressed_mean):
# each rounding is within 2^-9 of the value, so the mean is within 2^-8 of the leaf's scale.
BF16_ROUNDING = 2.0**-8


def _tolerances(combo: tuple[str, ...]) -> tuple[float, float]:
    """(loss, relative gradient) bounds: fp32 agreement, or the bf16 rounding the features add."""
    if "bf16" in combo:
        # bfloat16 compute on both sides, so only the order of rounding differs: bf16 keeps 8
        # significant bits (2^-8), a sharded reduction rounds its partial sums in another order,
        # and gradients that are differences of nearly equal terms (softmax, the MoE router)
        # lose a few more bits. A sharding mistake is an error of order 1, far above either.
        return 2.0**-8 * 6, 2.0**-4
    if "compression" in combo:
        return 1e-5, 2 * BF16_ROUNDING
    return 1e-5, 1e-5


def eval_tolerance(combo: tuple[str, ...], loss: float) -> float:
    """How far the eval step's loss may be from the train step's ``loss`` on the same batch: the
    same network in sequence, so only summation order separates them: bf16 compute's rounding
    (the loss bound), or in fp32 a few ulps (``tests.support.SAME_LOSS_REL`` of the loss)."""
    return _tolerances(combo)[0] if "bf16" in combo else SAME_LOSS_REL * abs(loss)


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_composing_features_match_one_device(combo):
    raw, sizes = _config(combo)
    cfg = _cfg(raw)
    run = setup_training(cfg, mesh_of(**sizes))
    # A run no preset's setup fits beside (more than 8 devices with dp's data 2) is the default preset, dp.
    default = set() if set(combo) & set(compat.PRESETS) else {"dp"}
    assert set(run.plan.active_features()) == set(combo) | default
    params, _ = run.init_state()
    batch = _placed(run, _batch(cfg.model.vocab_size))
    loss, grads = run.grads(params, batch)
    # MoE's auxiliary losses are microbatch statistics (compat.NOTES): the reference accumulates over
    # as many microbatches (a pipeline's, or grad_accum's).
    splits = cfg.pipeline.microbatches if run.plan.pipeline is not None else cfg.grad_accum
    ref_loss, ref_grads = _reference(_model_key(cfg), splits if "moe" in combo else 1)
    loss_tol, rel = _tolerances(combo)
    assert abs(float(loss) - ref_loss) <= loss_tol, (float(loss), ref_loss)
    if run.plan.pipeline is not None:  # stored in the pipeline's layer order: compare in logical order
        grads = run.plan.sequential_params(grads)
    assert_trees_close(jax.device_get(grads), ref_grads, rel=rel, what="gradient")
    if run.plan.pipeline is not None:
        eval_loss = float(run.eval_step(params, batch))  # the same network, in sequence: same rounding bound
        assert abs(eval_loss - float(loss)) <= eval_tolerance(combo, float(loss)), "eval runs another network"
