"""The report and plan command lines on every shipped config and mesh; hardware profiles; plots and JSON."""

import json
import pathlib

import pytest

from shardlib.plan import main as plan_main
from shardlib.report.__main__ import main as report_main
from shardlib.report.analytic import hardware_flops, predict_terms
from shardlib.report.hardware import estimate_time, load_profile
from shardlib.report.layout import resolve_layout
from tests.support import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MESHES = sorted((ROOT / "meshes").glob("*.yaml"))
# GPU and multi-host meshes are emulated: the tests' backend has 8 CPU devices.
DEVICES = {"gpu-8": ["--devices", "8"], "two-host": ["--devices", "16"]}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_analytic_report_on_every_mesh(config, capsys):
    for mesh in MESHES:
        argv = ["--config", str(config), "--mesh", str(mesh), "--no-compile", "--hardware", "h100"]
        assert report_main(argv + DEVICES.get(mesh.stem, [])) == 0, mesh.stem
        out = capsys.readouterr().out
        assert f"on {mesh.stem}" in out and "predicted (analytic model)" in out and "time per step on h100" in out


def test_compiled_report_with_sweep_json_and_plots(tmp_path, capsys):
    argv = [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--mesh",
        str(ROOT / "meshes/cpu-4.yaml"),
        "--sweep",
        "seq_len=16,32",
        "--json",
        str(tmp_path / "r.json"),
        "--plots",
        str(tmp_path / "plots"),
        "--hardware",
        "h200",
        "model.n_layers=1",
        "batch_size=8",
        "seq_len=16",
    ]
    assert report_main(argv) == 0
    out = capsys.readouterr().out
    assert "compiled for cpu" in out and "measured collectives by kind" in out
    assert "sweep over seq_len" in out and "seq_len=32:" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["sizes"]["data"] == 2 and doc["sizes"]["model"] == 2
    assert doc["measured"]["collectives"] and doc["time"]["profile"] == "h200"
    assert [r["sizes"]["data"] for r in doc["sweep"]["reports"]] == [2, 2]
    model = lambda r: next(a for a in r["axes"] if a["axis"] == "model")
    small, large = (model(r) for r in doc["sweep"]["reports"])
    assert large["measured"] == pytest.approx(2 * small["measured"], rel=0.1)  # activations double with seq_len
    for name in ("bytes.png", "message_sizes.png", "sweep_seq_len.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sweep", "seq_len"], "--sweep wants key=v1,v2"),
        (["--hardware", "tpu9"], "unknown hardware profile 'tpu9'"),
        (["--devices", "4"], "has 8 devices"),
        (["model.d_ff=385"], "does not divide"),
    ],
)
def test_report_errors_are_one_line(extra, message, capsys):
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--mesh", str(ROOT / "meshes/cpu-8.yaml"), "--no-compile"]
    assert report_main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_plan_cli(capsys):
    # 16 H100s are two hosts: some plans put data on InfiniBand.
    assert plan_main(["--config", str(ROOT / "configs/tiny.yaml"), "--devices", "16", "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert "best:" in out and "InfiniBand" in out
    assert plan_main(["--config", str(ROOT / "configs/tiny.yaml"), "--devices", "8", "--presets", "zero3"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_hardware_profiles(tmp_path):
    h100, h200 = load_profile("h100"), load_profile("h200")
    assert h100.peak_flops("bfloat16") == h200.peak_flops("bfloat16") == 989e12
    assert h200.memory_gib > h100.memory_gib
    assert h100.links.within_host.bandwidth_gb_s > h100.links.across_hosts.bandwidth_gb_s
    custom = tmp_path / "mine.yaml"
    custom.write_text(
        "name: mine\npeak_tflops: {float32: 10}\nmemory_gib: 16\ndevices_per_host: 4\nmfu: 0.5\n"
        "links:\n  within_host: {name: pcie, bandwidth_gb_s: 16}\n  across_hosts: {name: eth, bandwidth_gb_s: 1}\n"
    )
    mine = load_profile(str(custom))
    assert mine.devices_per_host == 4
    custom.write_text("name: broken\n")
    with pytest.raises(ValueError, match="invalid hardware profile"):
        load_profile(str(custom))

    # Across hosts (4 per host) the data axis pays the slow link: slower than inside one host.
    layout = resolve_layout(tiny_config(), {"data": 8})
    terms, flops = predict_terms(layout), hardware_flops(layout)
    inside = estimate_time(
        terms, layout.sizes, flops, "float32", mine.model_copy(update={"devices_per_host": 8}), n_layers=2
    )
    across = estimate_time(terms, layout.sizes, flops, "float32", mine, n_layers=2)
    assert across.link_per_axis["data"] == "eth" and inside.link_per_axis["data"] == "pcie"
    assert across.comm_s > inside.comm_s and across.step_s >= across.compute_s
    assert across.exposed_s <= across.comm_s + 1e-12
