"""The report and plan command lines on every shipped config and mesh; hardware profiles; plots and JSON."""

import dataclasses
import importlib
import importlib.util
import json
import pathlib
import re
from types import SimpleNamespace

import pytest

import shardlib.analysis.planner
from shardlib.analysis.describe import main as describe_main
from shardlib.analysis.planner import main as plan_main
from shardlib.analysis.report.__main__ import main as report_main
from shardlib.analysis.report.analytic import predict_terms
from shardlib.analysis.report.compute import hardware_flops
from shardlib.analysis.report.hardware import estimate_time, load_profile
from shardlib.analysis.report.layout import resolve_layout
from shardlib.analysis.report.report import build_report, fmt_bytes
from shardlib.analysis.report.views import LINK_TIME_HINT
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
    assert out.startswith("verdict: ") and "over the wire (measured)" in out.splitlines()[0]
    assert "compiled, most of it" in out.splitlines()[0] and LINK_TIME_HINT not in out  # --hardware filled them
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


def test_the_report_opens_with_its_verdict_and_says_how_to_fill_empty_columns(capsys):
    """Analytic only, without --hardware: where the bytes go, that nothing was measured, memory; the link and
    time columns (and the measured ones) say which flag fills them."""
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--mesh", str(ROOT / "meshes/cpu-8.yaml"), "--no-compile"]
    assert report_main(argv) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert re.fullmatch(
        r"verdict: 11\.46 MiB a step per device over the wire \(predicted\), 79% over model \(tensor parallel: 100% "
        r"of the bytes predicted there\); not compiled, so nothing is measured against the minimum \(the analytic "
        r"model\): drop --no-compile; memory 59\.47 MiB per device predicted, most of it activations \(51\.13 MiB\)",
        first,
    ), first
    assert LINK_TIME_HINT in out and "measured, avoidable, ratio: compiling the step fills them" in out
    assert report_main([*argv, "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert LINK_TIME_HINT not in out and re.search(r"; step [\d.]+ us on h100 \([\d.]+ us of it exposed", out)


def test_the_verdict_names_the_axis_furthest_above_the_minimum_and_why():
    """A measured step: the axis with the most bytes beyond the analytic model, its ratio and avoidable share."""
    from shardlib.analysis.report.collectives import Collective
    from shardlib.analysis.report.report import AxisRow
    from shardlib.analysis.report.views import verdict

    report = build_report(resolve_layout(tiny_config(sharding="tp"), {"data": 4, "model": 2}))
    sliced = SimpleNamespace(inefficiency="all-reduce whose result is only sliced", axes=("model",))
    report.measured = SimpleNamespace(collectives=[sliced], memory=None)
    data_row, model_row = report.axes
    report.axes = [
        dataclasses.replace(data_row, measured=data_row.predicted * 1.01, avoidable=0.0),  # within 2%
        dataclasses.replace(model_row, measured=model_row.predicted * 1.5, avoidable=model_row.predicted * 0.25),
    ]
    text = verdict(report)
    excess = fmt_bytes(model_row.predicted * 0.5)
    assert (
        f"; model moves 1.50x the minimum (+{excess}), {fmt_bytes(model_row.predicted * 0.25)} of it avoidable: "
        "all-reduce whose result is only sliced;" in text
    ), text
    report.axes[1] = dataclasses.replace(model_row, measured=model_row.predicted, avoidable=0.0)
    assert "every axis within 2% of the minimum (the analytic model) or below it" in verdict(report)
    assert Collective and AxisRow  # the types the stand-ins above imitate


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sweep", "seq_len"], "--sweep wants key=v1,v2"),
        (["--hardware", "tpu9"], "unknown hardware profile 'tpu9'"),
        (["--devices", "4"], "mesh 'cpu-8' has 8 devices (data=4 x model=2) but --devices is 4"),
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


def test_plan_exits_non_zero_listing_why_when_no_plan_fits(tmp_path, capsys):
    """On 8 H100s (one host) every HSDP candidate is FSDP; with 1 MiB a device nothing fits in memory."""
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--devices", "8", "--hardware"]
    assert plan_main([*argv, "h100", "--presets", "hsdp"]) == shardlib.analysis.planner.EXIT_NO_PLAN != 0
    captured = capsys.readouterr()
    dropped = re.search(
        r"error: no plan fits 8 x h100: all (\d+) candidates were dropped, for the reasons above", captured.err
    )
    assert dropped, captured.err
    assert f"dropped, not worth planning ({dropped.group(1)}); one per reason:" in captured.out
    assert "data fits inside one host: HSDP would be FSDP" in captured.out
    small = tmp_path / "small.yaml"
    small.write_text(
        "name: small\npeak_tflops: {float32: 10}\nmemory_gib: 0.001\ndevices_per_host: 8\nmfu: 0.5\n"
        "links:\n  within_host: {name: pcie, bandwidth_gb_s: 16}\n  across_hosts: {name: eth, bandwidth_gb_s: 1}\n"
    )
    assert plan_main([*argv, str(small), "--presets", "dp,fsdp"]) == shardlib.analysis.planner.EXIT_NO_PLAN
    captured = capsys.readouterr()
    assert "error: no plan fits 8 x small" in captured.err and "dropped, out of memory (" in captured.out


BENCH = sorted(p for p in ROOT.glob("bench/**/*") if p.is_file() and "__pycache__" not in p.parts)
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md")), *BENCH]


def test_the_docs_name_modules_that_exist_and_commands_that_run():
    """Every ``shardlib.x.y`` the docs name imports (a module, or an attribute of one), or is a former
    path; every ``python -m shardlib...`` is a module of its own that runs, not one that only says where
    it moved."""
    from shardlib._moved import MOVED

    for path in DOCS:
        text = path.read_text()
        for name in sorted(set(re.findall(r"\bshardlib(?:\.\w+)+", text))):
            assert name in MOVED or _resolves(name), f"{path.name} names {name}, which does not import"
        for module in sorted(set(re.findall(r"python -m (shardlib[\w.]*)", text))):
            assert module not in MOVED, f"{path.name} runs python -m {module}, which moved to {MOVED[module]}"
            spec = importlib.util.find_spec(module)
            main = importlib.util.find_spec(f"{module}.__main__") if spec.submodule_search_locations else spec
            assert main is not None and "__main__" in main.loader.get_source(main.name), f"{path.name}: {module}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attribute in parts[i:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


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


def test_the_recomputed_forward_follows_the_remat_policy_and_the_attention():
    """save_matmuls recomputes the attention's forward; save_matmuls_attention does not with cuDNN's
    fused kernel (whose outputs it keeps), and is save_matmuls with any other attention."""
    from shardlib.analysis.report.compute import model_flops

    def flops(remat, impl):
        layout = resolve_layout(tiny_config(model={"remat": remat}, attention={"impl": impl}), {"data": 1})
        return hardware_flops(layout), model_flops(layout)

    keeps_matmuls, model = flops("save_matmuls", "fused")
    assert flops("none", "fused") == (model, model) and keeps_matmuls > model
    assert flops("save_matmuls_attention", "fused")[0] == model
    assert flops("save_matmuls_attention", "dense")[0] == keeps_matmuls == flops("save_matmuls", "dense")[0]
    assert flops("full", "fused")[0] > keeps_matmuls


def _no_compile(monkeypatch):
    """Makes any compile fail the test: what these checks catch must be caught before one starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before validating the command line")

    monkeypatch.setattr(importlib.import_module("shardlib.analysis.report.measure"), "measure", refuse)


def _compiling_argv(*extra):
    return ["--config", str(ROOT / "configs/tiny.yaml"), "--mesh", str(ROOT / "meshes/cpu-8.yaml"), *extra]


@pytest.mark.parametrize(
    ("flag", "target", "message"),
    [
        ("--json", "file/r.json", "cannot write --json"),  # a file where a directory must be
        ("--json", "dir", "exists and is not a file"),
        ("--plots", "file", "exists and is not a directory"),
        ("--plots", "file/plots", "is a file, not a directory"),
    ],
)
def test_unwritable_outputs_are_one_line_before_compiling(flag, target, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("in the way")
    (tmp_path / "dir").mkdir()
    _no_compile(monkeypatch)
    assert report_main(_compiling_argv(flag, str(tmp_path / target))) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / target) in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("seq_lenn=16,32", "unknown config key 'seq_lenn'"),
        ("seq_len=16,abc", "--sweep seq_len=abc"),
        ("seq_len=16,-8", "--sweep seq_len=-8"),
        ("batch_size=32,30", "--sweep batch_size=30"),  # 30 sequences do not split over data=4
    ],
)
def test_sweep_is_validated_before_compiling(sweep, message, monkeypatch, capsys):
    _no_compile(monkeypatch)
    assert report_main(_compiling_argv("--sweep", sweep)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("mfu", ["0", "-0.5", "1.5"])
def test_mfu_outside_0_1_is_rejected(mfu, monkeypatch, capsys):
    _no_compile(monkeypatch)
    assert report_main(_compiling_argv("--hardware", "h100", "--mfu", mfu)) == 2
    assert f"--mfu is a fraction of the peak in (0, 1] (e.g. 0.4), got {float(mfu)}" in capsys.readouterr().err
    assert plan_main(["--config", str(ROOT / "configs/tiny.yaml"), "--devices", "8", "--mfu", mfu]) == 2
    assert "--mfu is a fraction" in capsys.readouterr().err


@pytest.mark.parametrize("devices", ["0", "-4"])
def test_plan_rejects_a_device_count_below_1(devices, capsys):
    assert plan_main(["--config", str(ROOT / "configs/tiny.yaml"), "--devices", devices]) == 2
    assert f"--devices is how many devices to plan for: at least 1, got {devices}" in capsys.readouterr().err


def test_plan_verify_fails_naming_the_missed_prediction(monkeypatch, capsys):
    """A prediction outside its bound is an exit status, not only a GAP in the text."""
    monkeypatch.setattr(shardlib.analysis.planner, "TOLERANCE", -1.0)  # every prediction misses
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--devices", "8", "--presets", "dp", "--axes", "data"]
    argv += ["--verify", "1", "model.n_layers=1", "batch_size=8", "seq_len=16"]
    assert plan_main(argv) == shardlib.analysis.planner.EXIT_MISSED != 0
    captured = capsys.readouterr()
    assert "GAP" in captured.out
    assert "prediction(s) off by more than" in captured.err
    assert "data=8 dp (grad_accum 1): data communication, ratio without avoidable" in captured.err
    assert "data=8 dp (grad_accum 1): memory, ratio" in captured.err


def test_user_facing_text_cites_no_issue_numbers():
    assert "issue #" not in shardlib.analysis.planner.__doc__
    for impl in ("dense", "ring", "allgather"):
        cfg = tiny_config(attention={"impl": impl})
        report = build_report(resolve_layout(cfg, {"data": 2, "seq": 4}))
        assert not [n for n in report.notes if "issue #" in n], report.notes


@pytest.mark.parametrize(
    ("impl", "says", "not_says"),
    [
        ("dense", "leaves attention to XLA, which all-gathers K and V", "impl=ring passes"),
        ("allgather", "attention.impl=allgather all-gathers K and V", "leaves attention to XLA"),
        ("ring", "attention.impl=ring passes K and V blocks round seq", "would move"),
    ],
)
def test_sequence_note_says_what_the_configured_attention_does(impl, says, not_says):
    cfg = tiny_config(attention={"impl": impl})
    report = build_report(resolve_layout(cfg, {"data": 2, "seq": 4}))
    (note,) = [n for n in report.notes if n.startswith("sequence:")]
    assert says in note and not_says not in note
    if impl == "ring":  # the gradients' extra hop: 1/(seq-1) of the model's reduce-scatter
        scatter = sum(t.wire_bytes for t in report.terms if t.kind == "reduce-scatter")
        assert fmt_bytes(scatter / 3) in note


def test_describe_counts_the_sequence_split_as_use_of_seq(capsys):
    """cpu-8-seq: no parameter is split over seq, but every activation's length is."""
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--mesh", str(ROOT / "meshes/cpu-8-seq.yaml")]
    assert describe_main(argv) == 0
    out = capsys.readouterr().out
    assert "WARNING: mesh axis 'seq'" not in out
    assert describe_main([*argv, "--sharding", "dp", "--mesh", str(ROOT / "meshes/cpu-8.yaml")]) == 0
    assert "WARNING: mesh axis 'model' (size 2) shards neither parameters nor the batch" in capsys.readouterr().out
