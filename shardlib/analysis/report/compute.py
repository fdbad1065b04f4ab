"""The analytic compute model: FLOPs per step per device, and a pipeline's idle share of it.

Model FLOPs are (6 x params + attention) per token (``ModelConfig.flops_per_token``)
split over the shards that divide the work; hardware FLOPs add what the step
recomputes (``remat``, or a pipeline executor's recomputed forwards). The bubble is
the schedule's table run in lockstep at the executor's cost per action. The bytes
each step moves are ``shardlib.analysis.report.analytic``'s.
"""

from __future__ import annotations

from fractions import Fraction

from shardlib.analysis.report.layout import Layout
from shardlib.parallel.pipeline.actions import tick_costs
from shardlib.parallel.pipeline.plan import schedule_for


def model_flops(layout: Layout) -> float:
    """Model FLOPs per step per device: (6 x params + attention) per token, split over the work shards."""
    cfg = layout.cfg
    return cfg.model.flops_per_token(cfg.seq_len) * cfg.batch_size * cfg.seq_len / layout.work_shards


def hardware_flops(layout: Layout) -> float:
    """FLOPs the device executes: model FLOPs plus the forward recomputed by ``remat: full``.

    ``full`` recomputes every matmul of a layer but the MLP's down projection
    (whose output only feeds the next layer, not this layer's backward pass);
    ``save_matmuls`` keeps every weight matmul output, so only the attention
    einsums (batched dots, not saved) are recomputed; ``save_matmuls_attention``
    with ``attention.impl: fused`` (cuDNN's kernel on a GPU) keeps its outputs
    too, and recomputes no matmul.
    """
    cfg = layout.cfg
    m = cfg.model
    tokens = cfg.batch_size * cfg.seq_len / layout.work_shards
    hk = m.resolved_head_dim
    recomputed = m.n_layers * (2 * m.d_model * hk * (m.n_heads + m.n_kv_heads) + 2 * m.d_model * m.d_ff)
    attention_forward = 4 * m.n_layers * m.n_heads * hk * cfg.seq_len
    extra = 0.0
    if layout.sizes["pipe"] > 1 and pipeline_recomputes(cfg):
        # The pipeline's executor recomputes each chunk's forward in its backward, whatever remat says.
        return model_flops(layout) * 4 / 3
    if m.remat == "full":
        extra = 2 * recomputed + attention_forward
    elif m.remat == "save_matmuls" or (m.remat == "save_matmuls_attention" and cfg.attention.impl != "fused"):
        extra = attention_forward
    return model_flops(layout) + extra * tokens


def pipeline_bubble(layout: Layout) -> float:
    """The share of a pipelined step its stages sit idle, 0 without a pipeline.

    From the table the config runs (``plan.schedule_for``: 1F1B's split without recomputation)
    in lockstep, as the SPMD executor runs it (every stage starts each tick together), at the
    executor's cost per action (``tick_costs``; the project's models split B from W) and the
    loss head's on the last virtual stage's forwards (``head_cost``): the compute time of a step
    is its work over (1 - bubble).
    """
    pipeline = getattr(layout.cfg, "pipeline", None)
    if layout.sizes["pipe"] < 2 or pipeline is None:
        return 0.0
    from shardlib.training.parallel_plan import pipeline_settings  # the training layer's reading of the config

    p = layout.sizes["pipe"]
    schedule = schedule_for(pipeline_settings(layout.cfg), p, moe=bool(layout.cfg.model.moe.n_experts))
    costs = tick_costs(schedule, pipeline_recomputes(layout.cfg))
    return float(schedule.lockstep_time(costs, head_cost(layout.cfg.model, layout.cfg.seq_len, p))[1])


def head_cost(model, seq_len: int, stages: int) -> Fraction:
    """The loss head's forward and backward (the vocabulary projection, 6 V D FLOPs a token) in
    forwards of one pipeline stage (its n_layers / ``stages`` layers, a third of their
    ``flops_per_token`` share): what the last virtual stage's forward adds to its tick."""
    head = 6 * model.vocab_size * model.d_model
    layers = model.flops_per_token(seq_len) - head
    return Fraction(head).limit_denominator(10**6) / Fraction(layers / (3 * stages)).limit_denominator(10**6)


def pipeline_recomputes(cfg) -> bool:
    """Whether the executor's backwards recompute their forward (``pipeline.recompute``, the default)."""
    pipeline = getattr(cfg, "pipeline", None)
    return pipeline is None or pipeline.recompute
