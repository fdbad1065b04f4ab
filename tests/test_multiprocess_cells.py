"""The compatibility table's multi-process cells, run: 2 processes x 4 devices against one device.

Every feature that composes with ``multiprocess`` is turned on in some run of two processes
(tests/mp_cells_worker.py, under the project's launcher), on a mesh whose devices alternate
between the processes. The runs are tests/test_compat.py's least-cost cover applied to the
pairs (multiprocess, feature), and each is held as that walk's cells are
(``assert_cell_matches_one_device``): the train step's loss and the gradients it applied against
one device (bfloat16 compute against float32, by the one-device bfloat16 run's error) and, for
pipelines, the eval step's loss on the same batch. Both processes run every cell in one launch, so the price of
starting and joining is paid once.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from shardlib.parallel import compat
from tests import procs
from tests.test_compat import (
    DILOCO,
    MULTIPROCESS,
    _cfg,
    _config,
    assert_cell_matches_one_device,
    cover,
    credited,
    reference,
)

RUN_FIRST = True  # one module fixture launches every cell (about 45 s): tests/conftest.py starts it first

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
    loss = float(got.pop("['loss']"))
    eval_loss = got.pop("['eval_loss']", None)
    paths, treedef = jax.tree_util.tree_flatten_with_path(reference(cfg, combo)[1])
    keys = [f"['grads']{jax.tree_util.keystr(path)}" for path, _ in paths]
    assert sorted(got) == sorted(keys)
    grads = jax.tree.unflatten(treedef, [got[key] for key in keys])
    assert_cell_matches_one_device(combo, cfg, loss, grads, None if eval_loss is None else float(eval_loss))
