"""The planner's analytic step time against published multi-node scaling tables.

    python bench/scaling/compare.py                       # every table here
    python bench/scaling/compare.py bench/scaling/mpt-7b-h100-fsdp.yaml

Each table (a YAML file beside this one, its source and assumptions in ``README.md``) is a model,
a hardware profile, a preset and published points: a mesh, a global batch and the published
throughput per GPU. One constant is calibrated per table: the compute efficiency (the profile's
``mfu``) that makes the prediction equal the published figure at the table's first (smallest)
point. Every other point is predicted at that constant on its own mesh and compared; the bound
is ``BOUND`` at every point (``tests/test_scaling.py``).

A point with a pipeline takes the planner's fastest variant on the published mesh among the
table's ``schedules`` (the schedule, its chunks and its microbatches are not published).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
BOUND = 0.15  # relative error allowed at every point

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(HERE.parent.parent))

from shardlib.analysis.plan_candidates import config_variants
from shardlib.analysis.planner import MeshPlan, evaluate_plan
from shardlib.analysis.report.hardware import load_profile
from shardlib.core.mesh import MESH_AXES
from shardlib.core.yaml_file import read_yaml
from shardlib.training.config import validate_config

MODEL_KEYS = ("n_heads", "d_model", "n_layers")  # per point in a weak-scaling table


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared point: its name, published and predicted throughput (the table's metric)."""

    point: str
    published: float
    predicted: float
    plan: MeshPlan

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


def tables() -> list[pathlib.Path]:
    """The checked-in tables (every YAML here with ``points``)."""
    return sorted(p for p in HERE.glob("*.yaml") if "points" in (read_yaml(p, "scaling table") or {}))


def load_table(path: str | pathlib.Path) -> dict:
    table = read_yaml(pathlib.Path(path), "scaling table")
    for key in ("name", "source", "metric", "hardware", "sharding", "model", "seq_len", "points"):
        if key not in table:
            raise ValueError(f"scaling table {path}: missing {key!r}")
    if table["metric"] not in ("tokens_per_s_per_gpu", "tflops_per_gpu"):
        raise ValueError(f"scaling table {path}: unknown metric {table['metric']!r}")
    return table


def _profile(table: dict):
    hw = table["hardware"]
    return load_profile(str(HERE / hw) if hw.endswith(".yaml") else hw)


def point_config(table: dict, point: dict):
    """The shardlib config of one published point: the table's model, with the point's widths."""
    model = dict(table["model"]) | {k: point[k] for k in MODEL_KEYS if k in point}
    model.setdefault("n_kv_heads", model["n_heads"])
    model.setdefault("d_ff", 64 * round(8 * model["d_model"] / 3 / 64))
    raw = {
        "model": model,
        "sharding": table["sharding"],
        "seq_len": table["seq_len"],
        "batch_size": point["batch_size"],
        "grad_accum": point.get("grad_accum", 1),
        "attention": table.get("attention", {}),
        "pipeline": table.get("pipeline", {}),
    }
    return validate_config(raw, f"{table['name']}, point {point_name(point)}")


def point_sizes(point: dict) -> dict[str, int]:
    sizes = dict.fromkeys(MESH_AXES, 1)
    if "mesh" in point:
        sizes.update(point["mesh"])
    else:
        sizes.update(data=point["dp"], pipe=point["pp"], model=point["tp"])
    if math.prod(sizes.values()) != point["gpus"]:
        raise ValueError(f"point {point_name(point)}: mesh {sizes} is not {point['gpus']} GPUs")
    return sizes


def point_name(point: dict) -> str:
    return f"{point['name']} on {point['gpus']}" if "name" in point else f"{point['gpus']} GPUs"


def predict_point(table: dict, point: dict, profile, mfu: float) -> tuple[float, MeshPlan]:
    """(the table's metric as predicted at compute efficiency ``mfu``, the plan it comes from)."""
    cfg, sizes = point_config(table, point), point_sizes(point)
    # Not published for the table's points: the pipeline schedule, and where ``grad_accum`` is left
    # out, the micro-batch size; the planner's fastest variant that fits (else its fastest).
    fixed = sizes["pipe"] == 1 and "grad_accum" in point
    variants = [cfg] if fixed else config_variants(cfg, sizes)
    schedules = table.get("schedules")
    # Tensor parallelism over a model axis of 1 is data parallelism (the planner drops it as redundant).
    sharding = "dp" if table["sharding"] == "tp" and sizes["model"] == 1 else table["sharding"]
    plans = [
        MeshPlan(sizes, sharding, v.model_copy(update={"sharding": sharding}))
        for v in variants
        if not schedules or sizes["pipe"] == 1 or v.pipeline.schedule in schedules
    ]
    for plan in plans:
        evaluate_plan(plan, profile, mfu)
    timed = [p for p in plans if p.time is not None]
    if not timed:
        raise ValueError(f"{table['name']}, point {point_name(point)}: no plan: {plans[0].dropped}")
    fitting = [p for p in timed if not p.dropped]
    best = min(fitting or timed, key=lambda p: p.step_s)
    tokens = cfg.batch_size * cfg.seq_len / best.step_s / point["gpus"]
    if table["metric"] == "tokens_per_s_per_gpu":
        return tokens, best
    return tokens * cfg.model.flops_per_token(cfg.seq_len) / 1e12, best


def calibrate(table: dict, profile) -> float:
    """The compute efficiency at which the first point's prediction equals its published figure."""
    point = table["points"][0]
    low, high = 1e-3, 1.0
    for _ in range(60):  # the prediction grows with the efficiency: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if predict_point(table, point, profile, mid)[0] < point["published"] else (low, mid)
    if high >= 1.0 - 1e-9:
        raise ValueError(f"{table['name']}: the first point needs a compute efficiency above 1")
    return (low + high) / 2


def compare(path: str | pathlib.Path) -> tuple[dict, float, list[Row]]:
    """(the table, its calibrated efficiency, one row per point)."""
    table = load_table(path)
    profile = _profile(table)
    mfu = calibrate(table, profile)
    rows = []
    for point in table["points"]:
        predicted, plan = predict_point(table, point, profile, mfu)
        rows.append(Row(point_name(point), float(point["published"]), predicted, plan))
    return table, mfu, rows


def format_comparison(table: dict, mfu: float, rows: list[Row]) -> str:
    unit = {"tokens_per_s_per_gpu": "tokens/s/GPU", "tflops_per_gpu": "TFLOP/s/GPU"}[table["metric"]]
    src = table["source"]
    out = [
        f"{table['name']}",
        f"  source: {src['repository']} {src['path']} @ {src['commit'][:12]}",
        f"  calibrated on {rows[0].point}: compute efficiency {mfu:.3f}; bound {BOUND:.0%} at every point",
        "",
        f"  {'point':16s} {'published':>10s} {'predicted':>10s} {'error':>7s}  plan ({unit})",
    ]
    for r in rows:
        flag = "" if abs(r.error) <= BOUND else "  OUT"
        out.append(f"  {r.point:16s} {r.published:10,.1f} {r.predicted:10,.1f} {r.error:+7.1%}  {r.plan.label}{flag}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    paths = argv or [str(p) for p in tables()]
    worst = 0.0
    for path in paths:
        table, mfu, rows = compare(path)
        print(format_comparison(table, mfu, rows) + "\n")
        worst = max([worst, *(abs(r.error) for r in rows)])
    return 0 if worst <= BOUND else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
