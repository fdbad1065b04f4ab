"""Ulysses attention and its hybrid with the ring, against one device.

* ``dot_product_attention(impl="ulysses")`` on seq 4 x data 2 against ``jax.nn.dot_product_attention``
  on one device: the output and the gradients of q, k, v and the bias within 1e-5 of each leaf's
  scale, causal by index, packed documents (segment ids, positions restarting), permuted positions,
  a per-head and a head-shared bias; the dense and the fused kernel inside; grouped-query heads with
  fewer kv heads (2) than the degree (4), so each kv head is repeated. The hybrid (degree 2: the
  ring across two groups) likewise, and inside a user's own shard_map (context (b)).
* Heads that do not split over the degree are refused, naming the counts.
* The real train step (grad_accum 2, a vocabulary larger than a device's tokens) with the hybrid on
  seq 4 x data 2 (zig-zag ring order) and in a pipeline (pipe 2 x seq 4): the loss within 1e-5 and
  every gradient within 1e-5 of its leaf's scale, against the model on one device.
"""

from __future__ import annotations

import functools

import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from shardlib.parallel.seq_attention import dot_product_attention
from tests.support import mesh_of, tiny_config
from tests.test_compat import _batch, _placed, assert_cell_matches_one_device, sgd_setup, step_outputs
from tests.test_seq_attention import B, H, L, _assert_matches, _case_id, _inputs, _reference, _run, _shardlib_mesh

# (causal, bias, mask_by): index-causal, packed documents with a bias, permuted positions, bidirectional.
CASES = [(True, False, None), (True, True, "segments"), (True, False, "positions"), (False, True, None)]
SETTINGS = {"dense": {}, "fused": {"ulysses_kernel": "fused"}, "hybrid": {"ulysses_degree": 2}}


@pytest.mark.parametrize("kernel", list(SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_jax_on_one_device(kernel, case):
    """seq 4 x data 2 through the rules: 4 heads, 2 kv heads (repeated twice for degree 4)."""
    attend = functools.partial(dot_product_attention, impl="ulysses", rules=_shardlib_mesh(), **SETTINGS[kernel])
    _assert_matches(_run(attend, *case), _reference(*case))


@pytest.mark.parametrize("kernel", ["dense", "hybrid"])
def test_head_shared_bias_per_row(kernel):
    """A bias [B, 1, L, M]: gathered over the group's query rows rather than split by head."""
    case = (True, True, "segments")
    attend = functools.partial(dot_product_attention, impl="ulysses", rules=_shardlib_mesh(), **SETTINGS[kernel])
    _assert_matches(_run(attend, *case, bias_shape=(B, 1, L, L)), _reference(*case, bias_shape=(B, 1, L, L)))


def test_hybrid_inside_a_users_shard_map():
    """Context (b): the user's shard_map makes `sp` manual; the hybrid on this device's blocks."""
    mesh = jax.make_mesh((4, 2), ("sp", "dp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8])
    case = (True, True, "segments")
    seq = P("dp", "sp")
    specs = {"query_segment_ids": seq, "key_segment_ids": seq, "query_positions": seq, "key_positions": seq}

    def attend(q, k, v, bias, is_causal, **masks):
        def body(q, k, v, bias, masks):
            return dot_product_attention(
                q, k, v, bias, is_causal=is_causal, impl="ulysses", seq_axis="sp", ulysses_degree=2, **masks
            )

        in_specs = (seq, seq, seq, P(None, None, "sp"), specs)
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=seq)(q, k, v, bias, masks)

    _assert_matches(_run(attend, *case), _reference(*case))


def test_bad_settings_are_named():
    q, k, v, *_ = _inputs()
    seq8 = functools.partial(dot_product_attention, q, k, v, impl="ulysses", mesh=mesh_of(seq=8), seq_axis="seq")
    with pytest.raises(ValueError, match=r"4 query heads .* do not split over degree 8; .*ulysses_degree=4"):
        seq8()
    with pytest.raises(ValueError, match="the Ulysses degree 3 must divide the sequence axis's 8 devices"):
        seq8(ulysses_degree=3)
    with pytest.raises(ValueError, match=r"ulysses_kernel='fused' with ulysses_degree=4 < seq=8"):
        seq8(ulysses_degree=4, ulysses_kernel="fused")
    with pytest.raises(ValueError, match="Ulysses over all 8 devices attends whole sequences"):
        seq8(layout="zigzag")
    with pytest.raises(ValueError, match="impl='ring' takes neither"):
        dot_product_attention(q, k, v, rules=_shardlib_mesh(), ulysses_degree=2)
    assert H == 4


def test_the_plan_refuses_heads_that_do_not_split_before_tracing():
    """tp over model 2 leaves 2 heads per device: Ulysses over seq 4 is refused when the plan is built."""
    from shardlib.training.parallel_plan import build_plan

    cfg = tiny_config(sharding="tp", attention={"impl": "ulysses"})
    with pytest.raises(ValueError, match=r"2 query heads .* do not split over degree 4; .*ulysses_degree=2"):
        build_plan(cfg, mesh_of(seq=4, model=2))
    with pytest.raises(ValueError, match=r"attention.ulysses_degree=3 must divide seq=4 \(one of \[1, 2, 4\]\)"):
        build_plan(tiny_config(attention={"impl": "ulysses", "ulysses_degree": 3}), mesh_of(seq=4))


# The real train step: tiny model (4 heads, 2 kv heads), vocabulary 256 > the 16 tokens a device
# holds per microbatch (16 x 16 tokens over data 2 x seq 4, grad_accum 2).
STEPS = {
    "hybrid-data2-seq4-accum2": ({"grad_accum": 2}, {"data": 2, "seq": 4}, ("dp", "seq", "ulysses", "accumulation")),
    "hybrid-pipe2-seq4": (
        {"pipeline": {"schedule": "1f1b", "microbatches": 4}, "model": {"n_layers": 2}},
        {"pipe": 2, "seq": 4},
        ("dp", "pipeline", "seq", "ulysses"),
    ),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_train_step_matches_one_device(name):
    extra, sizes, combo = STEPS[name]
    attention = {"impl": "ulysses", "ulysses_degree": 2, "load_balance": "zigzag"}
    cfg = tiny_config(batch_size=16, seq_len=16, attention=attention, **extra)
    run = sgd_setup(cfg, mesh_of(**sizes))
    assert set(run.plan.active_features()) == set(combo)
    assert run.plan.attention.order is not None  # the ring's zig-zag order over the 2 groups
    assert_cell_matches_one_device(combo, cfg, *step_outputs(run, _placed(run, _batch(cfg.model.vocab_size))))


def test_the_planner_weighs_each_attention_over_seq():
    """``--attention``: ring, all-gather, Ulysses and every hybrid degree whose heads split, on each seq > 1
    mesh, each costed by the analytic model (nothing compiles). 4 heads: Ulysses over seq 8 is left out."""
    from shardlib.analysis.planner import make_plans
    from tests.test_plan import flat_profile

    cfg = tiny_config(batch_size=8, seq_len=64)
    choices = ("ring", "allgather", "ulysses", "hybrid")
    plans = make_plans(cfg, 8, flat_profile(2**30), presets=("dp",), axes=("data", "seq"), attention=choices)
    labels = {p.label.split(" (")[0] for p in plans if not p.dropped}
    expected = {f"data=2 x seq=4 dp {a}" for a in ("dense", "ring", "allgather", "ulysses", "ulysses2")}
    assert expected <= labels, labels
    assert {"seq=8 dp ulysses2", "seq=8 dp ulysses4"} <= labels and "seq=8 dp ulysses" not in labels
    timed = {p.label: p.step_s for p in plans if not p.dropped and "seq=4" in p.label}
    assert len(set(timed.values())) > 1, "every attention costs the same"
