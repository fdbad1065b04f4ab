"""Tests for shardlib.core.mesh: mesh files, validation messages and mesh construction.

conftest.py gives this process 8 emulated CPU devices.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from shardlib.cluster.launch import free_port
from shardlib.core.mesh import (
    MESH_AXES,
    MeshSpec,
    build_mesh,
    describe_mesh,
    load_mesh_spec,
    mesh_axis_sizes,
    mesh_spec,
    mesh_spec_from_dict,
    prepare_devices,
)

REPO = Path(__file__).resolve().parents[1]
MESH_DIR = REPO / "meshes"
SHIPPED = sorted(p.stem for p in MESH_DIR.glob("*.yaml"))


def sizes(**nontrivial):
    """All five axis sizes, 1 unless given."""
    return {axis: nontrivial.get(axis, 1) for axis in MESH_AXES}


# --- shipped mesh files -----------------------------------------------------------------------


def test_expected_files_are_shipped():
    expected = {"cpu-1", "cpu-4", "cpu-8", "cpu-8-fsdp", "gpu-1", "gpu-8", "two-host", "cpu-2x4"}
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_file_loads(stem):
    spec = load_mesh_spec(MESH_DIR / f"{stem}.yaml")
    assert spec.name == stem
    assert spec.description
    assert list(spec.within_host) == list(MESH_AXES)
    assert list(spec.across_hosts) == list(MESH_AXES)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [("cpu-8", sizes(data=4, model=2)), ("cpu-8-fsdp", sizes(data=8))],
)
def test_eight_device_files_build_on_all_devices(stem, expected):
    mesh = build_mesh(load_mesh_spec(MESH_DIR / f"{stem}.yaml"))
    assert mesh.axis_names == MESH_AXES
    assert mesh_axis_sizes(mesh) == expected
    assert mesh.devices.size == 8


@pytest.mark.parametrize(("stem", "n", "expected"), [("cpu-1", 1, sizes()), ("cpu-4", 4, sizes(data=2, model=2))])
def test_smaller_files_build_on_a_device_subset(stem, n, expected):
    mesh = build_mesh(load_mesh_spec(MESH_DIR / f"{stem}.yaml"), devices=jax.devices()[:n])
    assert mesh_axis_sizes(mesh) == expected
    assert list(mesh.devices.flat) == jax.devices()[:n]


def test_model_is_innermost_so_tensor_parallel_peers_are_adjacent():
    mesh = build_mesh(mesh_spec(data=4, model=2))
    ids = [d.id for d in mesh.devices.flat]
    pairs = mesh.devices.reshape(4, 2)
    assert ids == [d.id for d in jax.devices()]
    assert [[d.id for d in row] for row in pairs] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_axis_types_are_all_auto():
    mesh = build_mesh(mesh_spec(data=2, seq=2, model=2))
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * len(MESH_AXES)


# --- -1 resolution and construction -----------------------------------------------------------


def test_minus_one_absorbs_remaining_devices():
    mesh = build_mesh(mesh_spec(data=-1, model=2))
    assert mesh_axis_sizes(mesh) == sizes(data=4, model=2)


def test_minus_one_alone_takes_every_device():
    assert mesh_axis_sizes(build_mesh(mesh_spec(expert=-1))) == sizes(expert=8)


def test_across_hosts_minus_one_is_one_in_a_single_process():
    spec = mesh_spec_from_dict({"within_host": {"data": 4, "model": 2}, "across_hosts": {"data": -1}})
    assert mesh_axis_sizes(build_mesh(spec)) == sizes(data=4, model=2)


def test_mesh_spec_fills_missing_axes_in_order():
    spec = mesh_spec(model=2, data=4)
    assert spec.within_host == sizes(data=4, model=2)
    assert list(spec.within_host) == list(MESH_AXES)
    assert spec.across_hosts == sizes()
    assert spec.name == "<inline>"


def test_describe_mesh():
    assert describe_mesh(build_mesh(mesh_spec(data=4, model=2))) == (
        "data=4 x model=2 (8 cpu devices; pipe, expert, seq = 1)"
    )
    assert describe_mesh(build_mesh(mesh_spec(data=8))) == ("data=8 (8 cpu devices; pipe, expert, seq, model = 1)")
    one = build_mesh(mesh_spec(), devices=jax.devices()[:1])
    assert describe_mesh(one) == "single device (1 cpu device; all axes = 1)"


def test_prepare_devices_is_a_no_op_once_backends_run():
    jax.devices()  # make sure the backend is up, as it is in any real program by now
    prepare_devices(MeshSpec(within_host={}, across_hosts={}, emulate_cpu_devices=2))
    assert jax.device_count() == 8


# --- validation errors ------------------------------------------------------------------------


def write_mesh(tmp_path, text, stem="broken"):
    path = tmp_path / f"{stem}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"within_host": {"dta": 8}}, r"unknown axis 'dta'.*data, pipe.*did you mean 'data'"),
        ({"within_host": {"tensor": 8}}, r"unknown axis 'tensor' in within_host; valid axes"),
        ({"within_host": {}, "across_hosts": {"modle": 2}}, r"'modle' in across_hosts.*'model'"),
        ({"within_host": {}, "acros_hosts": {}}, r"unknown key 'acros_hosts'.*'across_hosts'"),
        (
            {"within_host": {"data": 0}},
            r"within_host\.data must be a positive integer or -1, got 0",
        ),
        ({"within_host": {"data": -2}}, r"within_host\.data .* got -2"),
        ({"within_host": {"data": 2.0}}, r"within_host\.data .* got 2\.0"),
        ({"within_host": {"data": "4"}}, r"within_host\.data .* got '4'"),
        ({"within_host": {"data": True}}, r"within_host\.data .* got True"),
        ({"within_host": {"data": -1, "model": -1}}, r"within_host has -1 on data, model"),
        ({"within_host": {}, "across_hosts": {"data": -1, "pipe": -1}}, r"across_hosts has -1"),
        ({"within_host": {}, "emulate_cpu_devices": 0}, r"emulate_cpu_devices .* got 0"),
        ({"within_host": {}, "emulate_cpu_devices": "8"}, r"emulate_cpu_devices .* got '8'"),
        ({"within_host": {}, "platform": "cuda"}, r"platform must be one of cpu, gpu, tpu.*'cuda'"),
        ({"within_host": [4, 2]}, r"within_host must map axis names to sizes"),
        ({"within_host": {}, "description": 3}, r"description must be a string"),
        ({"across_hosts": {}}, r"missing 'within_host'"),
    ],
)
def test_invalid_dict_is_rejected_naming_the_mesh_and_culprit(d, match):
    with pytest.raises(ValueError, match=match):
        mesh_spec_from_dict(d, name="my-mesh")
    with pytest.raises(ValueError, match=r"^mesh 'my-mesh'"):
        mesh_spec_from_dict(d, name="my-mesh")


def test_mesh_spec_validates_too():
    with pytest.raises(ValueError, match=r"mesh '<inline>': unknown axis 'fsdp'"):
        mesh_spec(fsdp=8)
    with pytest.raises(ValueError, match=r"within_host\.model .* got 0"):
        mesh_spec(model=0)


def test_bad_file_content_names_the_path(tmp_path):
    path = write_mesh(tmp_path, "within_host: {data: 4, modle: 2}\n", stem="typo")
    with pytest.raises(ValueError, match=r"typo\.yaml.*unknown axis 'modle'.*'model'"):
        load_mesh_spec(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"mesh file not found: .*nowhere\.yaml"):
        load_mesh_spec(tmp_path / "nowhere.yaml")


def test_invalid_yaml_names_the_path(tmp_path):
    path = write_mesh(tmp_path, "within_host: {data: 4\n", stem="unclosed")
    with pytest.raises(ValueError, match=r"invalid YAML in mesh file .*unclosed\.yaml"):
        load_mesh_spec(path)


@pytest.mark.parametrize("text", ["", "- data: 4\n"])
def test_file_that_is_not_a_mapping_is_rejected(tmp_path, text):
    with pytest.raises(ValueError, match=r"empty\.yaml.*expected a mapping"):
        load_mesh_spec(write_mesh(tmp_path, text, stem="empty"))


def test_too_few_devices_says_how_many_and_what_kind():
    spec = load_mesh_spec(MESH_DIR / "cpu-8.yaml")
    with pytest.raises(
        ValueError,
        match=r"^mesh 'cpu-8' needs 8 devices \(data=4 x model=2\) but 4 cpu devices are available",
    ):
        build_mesh(spec, devices=jax.devices()[:4])


def test_too_many_devices_is_an_error_too():
    with pytest.raises(ValueError, match=r"needs 4 devices \(data=2 x model=2\) but 8 cpu devices"):
        build_mesh(load_mesh_spec(MESH_DIR / "cpu-4.yaml"))


def test_minus_one_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match=r"data=-1 x model=3 needs a multiple of 3 devices.*8 cpu devices"):
        build_mesh(mesh_spec(data=-1, model=3))


def test_platform_mismatch_with_given_devices():
    spec = MeshSpec(within_host={"data": 8}, across_hosts={}, platform="gpu", name="g")
    with pytest.raises(ValueError, match=r"mesh 'g' is for platform 'gpu' but got cpu devices"):
        build_mesh(spec, devices=jax.devices())


def test_unavailable_platform_is_a_value_error():
    # conftest restricts JAX to the CPU backend, so there is no TPU to find.
    spec = MeshSpec(within_host={}, across_hosts={}, platform="tpu", name="t")
    with pytest.raises(ValueError, match=r"mesh 't' is for platform 'tpu'"):
        build_mesh(spec)


def test_multi_host_spec_in_one_process_gives_a_clear_error():
    spec = load_mesh_spec(MESH_DIR / "cpu-2x4.yaml")
    with pytest.raises(
        ValueError,
        match=r"mesh 'cpu-2x4' needs 2 processes \(across_hosts data=2\) but the 8 cpu devices "
        r"belong to 1 process.*jax\.distributed\.initialize",
    ):
        build_mesh(spec)


# --- two real processes -----------------------------------------------------------------------

_WORKER = """
import sys
import jax
from shardlib.core.mesh import build_mesh, describe_mesh, load_mesh_spec, mesh_axis_sizes
from shardlib.core.mesh import prepare_devices

spec = load_mesh_spec("meshes/cpu-2x4.yaml")
prepare_devices(spec)
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
mesh = build_mesh(spec)
assert mesh_axis_sizes(mesh) == {"data_replica": 1, "data": 4, "pipe": 1, "expert": 1, "seq": 1, "model": 2}
# data is the only axis that crosses processes: each half of data lives on one process,
# and both model peers of a row share a process.
owners = [[d.process_index for d in row] for row in mesh.devices.reshape(4, 2)]
assert owners == [[0, 0], [0, 0], [1, 1], [1, 1]], owners
print(describe_mesh(mesh))
jax.distributed.shutdown()
"""


def test_cpu_2x4_builds_across_two_processes():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(port), str(pid)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert "data=4 x model=2 (8 cpu devices in 2 processes" in out
