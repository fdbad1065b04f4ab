"""What the DiLoCo tests share (tests/test_diloco*.py): the runs' config, compiling and stepping a run, and
DiLoCo written straight from the paper (Douillard et al. 2023, Algorithm 1; streaming DiLoCo, Douillard et
al. 2025) on single-device replicas in plain JAX and optax, to hold the library's steps to.

The single-device reference step and the held-out loss compile once per config (``functools.cache``), across
every module that uses them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import numpy as np
import optax
from flax import nnx

from shardlib.analysis.report.measure import abstract_batch, measure_compiled
from shardlib.models.layers import cross_entropy
from shardlib.training.data import load_token_splits
from shardlib.training.metrics import read_metrics
from shardlib.training.setup import TrainingSetup, setup_training
from shardlib.training.train_state import abstract_state, make_optimizer
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
