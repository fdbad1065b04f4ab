"""The HLO reader of shardlib.analysis.report on hand-written HLO text: no compilation, milliseconds.

Covers what a compile on this machine cannot show: GPU async pairs and
wrappers, every replica-group syntax, nested loops with known trip counts.
"""

import pytest

from shardlib.analysis.report.collectives import find_collectives, split_by_axis, wire_bytes
from shardlib.analysis.report.groups import group_axes, parse_replica_groups
from shardlib.analysis.report.hlo import parse_hlo, shape_bytes

MESH_8 = {"data": 8, "pipe": 1, "expert": 1, "seq": 1, "model": 1}
MESH_3D = {"data": 2, "pipe": 1, "expert": 1, "seq": 2, "model": 2}

# An outer loop of 3 around an inner loop of 4 holding an all-reduce over data;
# a GPU-style async all-gather pair and an async-wrapped reduce-scatter in the entry.
NESTED = """\
HloModule test, entry_computation_layout={()->f32[8]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%inner_body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[256]{0} get-tuple-element(%p), index=1
  %ar = f32[256]{0} all-reduce(%v), channel_id=1, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %ar)
}

%inner_cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  ROOT %w = (s32[], f32[256]{0}) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}
}

%outer_cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%wrapped_rs (a: f32[64]) -> f32[8] {
  %a = f32[64]{0} parameter(0)
  ROOT %rs = f32[8]{0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[256], y: f32[8], z: f32[64]) -> f32[8] {
  %x = f32[256]{0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %z = f32[64]{0} parameter(2)
  %c = s32[] constant(0)
  %init = (s32[], f32[256]{0}) tuple(%c, %x)
  %loop = (s32[], f32[256]{0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  %ags = (f32[8]{0}, f32[64]{0}) all-gather-start(%y), channel_id=2, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %agd = f32[64]{0} all-gather-done(%ags)
  %as = ((f32[64]{0}), f32[8]{0}, u32[]) async-start(%z), calls=%wrapped_rs
  %ad = f32[8]{0} async-done(%as), calls=%wrapped_rs
  ROOT %out = f32[8]{0} add(%ad, %y)
}
"""


def test_nested_loops_multiply_trip_counts_and_async_pairs_count_once():
    module = parse_hlo(NESTED)
    found = {c.kind: c for c in find_collectives(module, MESH_8)}
    assert module.unknown_trip_counts == 0
    assert found["all-reduce"].count == 3 * 4
    assert found["all-reduce"].axes == ("data",)
    assert found["all-reduce"].wire_bytes == pytest.approx(2 * 7 / 8 * 1024)
    # The -start is counted, the -done is not; bytes come from the operand (f32[8]) times the group.
    assert found["all-gather"].count == 1
    assert found["all-gather"].buffer_bytes == 8 * 4 * 8
    # Inside the async wrapper: once, although async-done names the same computation.
    assert found["reduce-scatter"].count == 1
    assert found["reduce-scatter"].buffer_bytes == 64 * 4
    assert len(find_collectives(module, MESH_8)) == 3


def test_loop_without_trip_count_counts_once_and_is_flagged():
    text = NESTED.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    module = parse_hlo(text)
    ar = next(c for c in find_collectives(module, MESH_8) if c.kind == "all-reduce")
    assert ar.count == 3
    assert module.unknown_trip_counts == 1


@pytest.mark.parametrize(
    ("text", "groups"),
    [
        ("{{0,1},{2,3}}", [[0, 1], [2, 3]]),
        ("{}", []),
        ("[4,2]<=[8]", [[0, 1], [2, 3], [4, 5], [6, 7]]),
        ("[2,4]<=[4,2]T(1,0)", [[0, 2, 4, 6], [1, 3, 5, 7]]),
        # jax 0.10.2's form on a data=4 x model=2 mesh: axis names are XLA's, not the mesh's.
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_2'}", [[0, 1], [2, 3], [4, 5], [6, 7]]),
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}", [[0, 2, 4, 6], [1, 3, 5, 7]]),
        (
            "mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_0'}",
            [[0, 1], [2, 3], [4, 5], [6, 7]],
        ),
        ("mesh['a'=8] {'a':(1)2}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("mesh['a'=8] {'a':(2)2}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
        ("mesh['a'=2,'b'=4] {'a','b'}", [[0, 1, 2, 3, 4, 5, 6, 7]]),
    ],
)
def test_replica_group_syntaxes(text, groups):
    assert parse_replica_groups(text) == groups


def test_groups_name_the_right_axes_on_a_three_axis_mesh():
    # data=2 x seq=2 x model=2: flat position = 4 * data + 2 * seq + model.
    assert group_axes([[0, 1], [2, 3], [4, 5], [6, 7]], MESH_3D) == (("model",), True)
    assert group_axes([[0, 2], [1, 3], [4, 6], [5, 7]], MESH_3D) == (("seq",), True)
    assert group_axes([[0, 4], [1, 5], [2, 6], [3, 7]], MESH_3D) == (("data",), True)
    assert group_axes([[0, 2, 4, 6], [1, 3, 5, 7]], MESH_3D) == (("data", "seq"), True)
    assert group_axes([[0, 1, 2, 3, 4, 5, 6, 7]], MESH_3D) == (("data", "seq", "model"), True)
    # Pairs of a ring over seq.
    assert group_axes([[0, 2], [2, 0], [1, 3], [3, 1]], MESH_3D, pairs=True) == (("seq",), True)
    # Half of a 4-wide data axis is a partial group.
    assert group_axes([[0, 1]], {"data": 4}) == (("data",), False)


def test_wire_bytes_and_hierarchical_split_add_up():
    assert wire_bytes("all-reduce", 800, 8) == pytest.approx(1400)
    assert wire_bytes("all-gather", 800, 8) == pytest.approx(700)
    assert wire_bytes("collective-permute", 800, 2) == 800
    assert wire_bytes("all-reduce", 800, 1) == 0
    sizes = {"data": 4, "pipe": 1, "expert": 1, "seq": 2, "model": 1}
    for kind in ("all-reduce", "all-gather", "reduce-scatter"):
        shares = split_by_axis(kind, 1000, ("data", "seq"), sizes)
        assert sum(shares.values()) == pytest.approx(wire_bytes(kind, 1000, 8))
        assert shares["seq"] > shares["data"]  # the inner axis carries the full-size phase


def test_shapes():
    assert shape_bytes("(f32[4,8]{1,0}, bf16[16], /*index=2*/s32[])") == 128 + 32 + 4
    assert shape_bytes("pred[3]") == 3
    assert shape_bytes("f8e4m3fn[10]") == 10
