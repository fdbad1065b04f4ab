"""The step profile: ops classified by what they compute, and each instant of a step counted once."""

from __future__ import annotations

import pytest

from shardlib.analysis import step_profile
from shardlib.analysis.op_categories import hlo_categories, name_category
from shardlib.analysis.step_profile import IDLE, OpEvent, attribute

# A GPU-style module: a cuBLAS call, a Triton GEMM fusion, cuDNN attention, async collectives, a loop.
HLO = """HloModule jit_train_step, num_partitions=2

%gemm_body (p0: bf16[8,16], p1: bf16[16,4]) -> bf16[8,4] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,4]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%moves (p0: f32[8,4]) -> f32[4,8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = f32[4,8]{1,0} transpose(%p0), dimensions={1,0}
}

%adds (p0: f32[8,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %c = f32[] constant(1)
  %b = f32[8,4]{1,0} broadcast(%c), dimensions={}
  ROOT %add.1 = f32[8,4]{1,0} add(%p0, %b)
}

%gather_body (p0: f32[4]) -> f32[8] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %all-gather.1 = f32[8]{0} all-gather(%p0), replica_groups={{0,1}}, dimensions={0}
}

%loop_body (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %tuple.9 = (s32[], f32[8,4]{1,0}) tuple(%t)
}

%loop_cond (t: (s32[], f32[8,4])) -> pred[] {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %cst = pred[] constant(false)
}

ENTRY %main (a: bf16[8,16], b: bf16[16,4], x: f32[8,4], s: f32[4]) -> f32[8,4] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,4]{1,0} parameter(1)
  %x = f32[8,4]{1,0} parameter(2)
  %s = f32[4]{0} parameter(3)
  %gemm_fusion_dot.3 = bf16[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_body
  %cublas-gemm.2 = (bf16[8,4]{1,0}, s8[64]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %fmha.5 = (bf16[8,4]{1,0}, f32[8]{0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %kernel.6 = f32[8,4]{1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/splash_attention/fwd"}
  %kernel.7 = f32[8,4]{1,0} custom-call(%x), custom_call_target="mosaic_gpu", metadata={op_name="jit(step)/mlp"}
  %transpose_fusion = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%moves
  %add_fusion = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%adds
  %all-reduce-start.1 = f32[8,4]{1,0} all-reduce-start(%x), replica_groups={{0,1}}, to_apply=%adds
  %all-reduce-done.1 = f32[8,4]{1,0} all-reduce-done(%all-reduce-start.1)
  %all-gather-start = ((f32[4]{0}), f32[8]{0}) async-start(%s), calls=%gather_body
  %all-gather-done = f32[8]{0} async-done(%all-gather-start)
  %copy.4 = f32[8,4]{1,0} copy(%x)
  %init = (s32[], f32[8,4]{1,0}) tuple(%s, %x)
  %while.1 = (s32[], f32[8,4]{1,0}) while(%init), condition=%loop_cond, body=%loop_body
  ROOT %r = f32[8,4]{1,0} get-tuple-element(%while.1), index=1
}
"""


def test_hlo_ops_are_classified_by_what_they_compute():
    got = hlo_categories(HLO)
    expected = {
        "gemm_fusion_dot.3": "matmul",
        "cublas-gemm.2": "matmul",
        "fmha.5": "attention",
        "kernel.6": "attention",  # an unknown kernel, named by the JAX code that emitted it
        "kernel.7": "other",
        "transpose_fusion": "copy",
        "add_fusion": "elementwise",
        "all-reduce-start.1": "collective",
        "all-reduce-done.1": "collective",
        "all-gather-start": "collective",  # an async wrapper, by the collective it wraps
        "copy.4": "copy",
        "while.1": "container",
    }
    assert {name: got[name] for name in expected} == expected


@pytest.mark.parametrize(
    "kernel, category",
    [
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),  # cuBLASLt on Hopper
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("cutlass3x_sm90_tensorop_gemm_bf16", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
        ("MemcpyDtoH", "host_transfer"),
        ("MemcpyDtoD", "copy"),
        ("loop_transpose_fusion_2", "copy"),
        ("input_reduce_fusion_1", "elementwise"),
        ("loop_add_fusion", "elementwise"),
        ("rng_bit_generator", "other"),
    ],
)
def test_kernels_without_an_hlo_name_are_classified_by_their_names(kernel, category):
    assert name_category(kernel) == category


def test_each_instant_goes_to_one_category_compute_before_communication():
    ops = [
        OpEvent("dot", "matmul", 0, 10),
        OpEvent("ar", "collective", 5, 20),  # half hidden under the matmul, half exposed
        OpEvent("add", "elementwise", 12, 14),  # under the collective's exposed half
        OpEvent("dot2", "matmul", 30, 40),  # after a gap of 10: the device idle
        OpEvent("dot3", "matmul", 40, 45),  # touching: no overlap, no gap
    ]
    window, exclusive, busy = attribute(ops)
    assert window == 45
    assert exclusive == {"matmul": 25, "collective": 8, "elementwise": 2, IDLE: 10}
    assert sum(exclusive.values()) == window
    assert busy == {"matmul": 25, "collective": 15, "elementwise": 2}


def test_a_folder_without_a_trace_is_named(tmp_path, capsys):
    assert step_profile.main([str(tmp_path)]) == 2
    assert f"no *.xplane.pb under {tmp_path}" in capsys.readouterr().err
