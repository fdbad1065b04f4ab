"""The compatibility table's multi-process cells, run: 2 processes x 4 devices against one device.

Every feature that composes with ``multiprocess`` is turned on in some run of two processes
(tests/mp_cells_worker.py, under the project's launcher), on a mesh whose devices alternate
between the processes. The runs are the greedy cover of tests/test_compat.py applied to the
pairs (multiprocess, feature), and each is held to that walk's single-device reference and
tolerances: the loss, every gradient relative to its leaf's scale and, for pipelines, the eval
step's loss on the same batch. Both processes run every cell in one launch, so the price of
starting and joining is paid once.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from shardlib.parallel import compat
from tests import procs
from tests.support import assert_trees_close
from tests.test_compat import (
    DILOCO,
    MULTIPROCESS,
    _cfg,
    _config,
    _model_key,
    _reference,
    _tolerances,
    cover,
    credited,
    eval_tolerance,
)

MP_PAIRS = {frozenset(p) for p in compat.composing_pairs() if MULTIPROCESS in p and DILOCO not in p}
MP_COMBOS = cover(MP_PAIRS)


def test_the_runs_cover_every_multiprocess_cell():
    assert MP_PAIRS <= set().union(*(credited(c) for c in MP_COMBOS))
    assert all(MULTIPROCESS in combo for combo in MP_COMBOS)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("mp-cells")
    args = ["-m", "shardlib.cluster.launch", "--processes", "2", "--grace", "30", "--"]
    args += ["tests/mp_cells_worker.py", str(out), *("+".join(c) for c in MP_COMBOS)]
    proc = procs.Proc(args, procs.env())
    assert proc.wait(timeout=600) == 0, proc.output[-6000:]
    return out


@pytest.mark.parametrize("combo", MP_COMBOS, ids="+".join)
def test_multiprocess_cell_matches_one_device(launched, combo):
    got = dict(np.load(launched / f"{'+'.join(combo)}.npz"))
    cfg = _cfg(_config(combo)[0])
    ref_loss, ref_grads = _reference(_model_key(cfg), cfg.grad_accum if "moe" in combo else 1)
    loss_tol, rel = _tolerances(combo)
    loss = float(got.pop("['loss']"))
    assert abs(loss - ref_loss) <= loss_tol, (loss, ref_loss)
    if (eval_loss := got.pop("['eval_loss']", None)) is not None:
        assert abs(float(eval_loss) - loss) <= eval_tolerance(combo, loss), "eval runs another network"
    expected = {f"['grads']{jax.tree_util.keystr(p)}": g for p, g in jax.tree_util.tree_flatten_with_path(ref_grads)[0]}
    assert got.keys() == expected.keys()
    assert_trees_close(got, expected, rel=rel, what="gradient")
