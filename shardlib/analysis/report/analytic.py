"""The analytic communication model: bytes each device must move per step, per strategy and mesh axis.

With N devices on an axis, P the parameter bytes a device's group shares,
m = grad_accum microbatches, b x s the tokens of one microbatch on one device
(b sequences, s = seq_len / seq positions) and c the compute dtype's bytes:

* data parallel (parameters replicated over the token axes): one gradient
  all-reduce per step, 2(N-1)/N * P: with ``grad_accum`` > 1 the step sums
  each device's partial gradients over the microbatches and reduces once
  (``shardlib.parallel.reduction.reduce_deferred``). The weights it does not
  reduce per use (a mixture of experts' router and experts, DiLoCo's inner
  steps) are the partitioner's: one all-reduce per microbatch;
* FSDP (parameters sharded over ``data``): all-gather in the forward pass,
  again in the backward pass, reduce-scatter of the gradients:
  3(N-1)/N * P per microbatch for the scanned layers. Parameters outside the
  layer scan (output projection, final norm) are gathered once when they are
  used in their own dtype: the backward pass reuses the forward's copy (XLA
  merges the two identical gathers). The embedding lookup gathers its table
  when it has no more rows than a device has tokens
  (``reduction.lookup_gathers_table``), and otherwise gathers the token ids
  and all-to-alls the looked-up rows, both ways;
* HSDP (``data_replica`` > 1): parameters are never split over ``data_replica``,
  so the FSDP terms above stay over ``data`` and each gradient shard is
  all-reduced over ``data_replica``: 2(R-1)/R of the bytes a device holds,
  once per step like data parallelism's all-reduce;
* tensor parallel (Megatron, heads and MLP over ``model``): per layer two
  all-reduces of the b*s*D activations forward and two backward (one more
  backward with ``remat: full``, which recomputes the attention half), plus
  the vocabulary-parallel embedding (one forward), the output projection (one
  backward) and the loss's max/sum over the vocabulary (small);
* sequence (``length`` over ``seq``): K and V gathered per layer,
  (p-1)/p of them forward and twice that backward (re-gather plus the
  reduce-scatter of their gradients). XLA (dense attention) and
  ``attention.impl: allgather`` gather (allgather keeps the forward's copy
  for the backward pass unless remat recomputes it); ring attention moves
  the gathers' bytes in p-1 permutes, overlapped with compute, and the
  gradients in p (one more hop home). ``attention.impl: ulysses`` instead
  all-to-alls q, k, v in and the output back per layer forward, and their
  mirror backward, each over groups of u = ``ulysses_degree`` devices, (u-1)/u
  of a [b, s, heads, K] block (kv heads repeated to a multiple of u); the
  hybrid (u < p) adds the ring's terms across its p/u groups;
* pipeline (``layers`` over ``pipe``): b*s*D per microbatch and boundary
  between virtual stages each way (a mean over the stages), and the gradients
  of the parameters outside the stages (embedding, head) summed over ``pipe``;
* experts (MoE, ``shardlib.parallel.experts``): per MoE layer and microbatch, two
  all-to-alls (dispatch, combine) of the capacity-padded [E, b, C, D] buffer
  forward, two backward, two more when remat recomputes the forward pass; the
  experts' gradients are not reduced over the expert axes (each device owns
  its experts). Without MoE layers the ``expert`` axis only splits the batch;
* DiLoCo and local SGD (``outer``, ``shardlib.parallel.diloco``): the inner steps
  reduce nothing over the replica axes (the terms above lose those axes), and
  every H steps one all-reduce of the pseudo-gradient, 2(R-1)/R of the
  parameter bytes a device holds (compressed: of its payload), is shown
  averaged over the H steps it serves.

Bytes are "wire" bytes (see ``collectives.wire_bytes``); multi-axis groups are
attributed to axes with ``collectives.split_by_axis``, as measured ones are.

Contract of this module: ``predict_terms(layout, platform)`` returns every
term above, in strategy order. The ``Term`` type and ``per_axis`` live in
``terms``; the builders in ``param_traffic`` (data parallel, FSDP, HSDP,
DiLoCo) and ``activation_traffic`` (tensor, sequence, pipeline, experts).
"""

from __future__ import annotations

from shardlib.analysis.report.activation_traffic import expert_terms, pipeline_terms, sequence_terms, tensor_terms
from shardlib.analysis.report.layout import Layout
from shardlib.analysis.report.param_traffic import diloco_terms, gradient_terms
from shardlib.analysis.report.terms import Term


def predict_terms(layout: Layout, platform: str | None = None) -> list[Term]:
    """Every predicted term for ``layout``, in strategy order (DiLoCo's last).

    ``platform``: where the step compiles ("cpu" for a measured step on emulated
    devices), which decides a pipeline's branching and so how often the stages'
    collectives run (``stage_passes``); None predicts the table's own actions.
    """
    terms = [
        *gradient_terms(layout, platform),
        *tensor_terms(layout, platform),
        *sequence_terms(layout, platform),
        *pipeline_terms(layout),
        *expert_terms(layout, platform),
    ]
    return diloco_terms(layout, terms)
