"""Starting a run from foreign weights: ``init_from=hf:/path/to/checkpoint_dir``.

``initial_state(run, log)`` is what the trainer calls when a run directory
holds no checkpoint yet: the imported parameters when ``cfg.init_from`` is
set, else the seeded random ones. A run that has checkpoints resumes from them
and ignores ``init_from``: the import is where a run starts, not where it
restarts.

The import honours the run's plan: every parameter lands on its sharding, and
the stacked layers are read in the plan's ``layer_order``, so an interleaved
pipeline stores HF layer ``layer_order[p]`` at position p, as
``init_state`` does for random weights. The optimizer state is created fresh
(zero moments, step 0) from the imported parameters, on its own shardings.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax

from shardlib.interop.hf_import import load_hf_params

HF_PREFIX = "hf:"


def parse_init_from(spec: str) -> pathlib.Path:
    """The checkpoint directory of ``init_from`` ``"hf:/path"``; ValueError naming the key otherwise."""
    if not spec.startswith(HF_PREFIX) or not spec[len(HF_PREFIX) :]:
        raise ValueError(f"init_from={spec!r}: expected hf:/path/to/checkpoint_dir (a Hugging Face directory)")
    path = pathlib.Path(spec[len(HF_PREFIX) :]).expanduser()
    if not path.is_dir():
        raise ValueError(f"init_from={spec!r}: {path} is not a directory")
    return path


def init_from_hf(run, hf_dir: str | pathlib.Path, log: Callable[[str], None] = print):
    """(params, opt_state) of ``run`` (a ``TrainingSetup``) with parameters read from ``hf_dir``.

    Params come in ``run.cfg.model.param_dtype`` on ``run.shardings.params``,
    layers in ``run.plan.layer_order``; opt_state is ``run.tx.init`` of them on
    ``run.shardings.opt_state``.
    """
    params = load_hf_params(hf_dir, run.cfg.model, run.shardings.params, layer_order=run.plan.layer_order)
    opt_state = jax.jit(run.tx.init, out_shardings=run.shardings.opt_state)(params)
    log(f"initialised the parameters from the Hugging Face checkpoint {hf_dir}")
    return params, opt_state


def initial_state(run, log: Callable[[str], None] = print):
    """A fresh run's (params, opt_state): imported per ``run.cfg.init_from``, else ``run.init_state()``."""
    if not run.cfg.init_from:
        return run.init_state()
    return init_from_hf(run, parse_init_from(run.cfg.init_from), log)
