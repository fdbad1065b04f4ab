"""Training metrics: JSON lines plus TensorBoard events, loss-curve plots and MFU.

A run directory holds ``metrics.jsonl`` (one JSON object per logged step, easy to read back
with :func:`read_metrics` or any JSON tool) and ``tb/`` (TensorBoard event files written by
tensorboardX). :func:`plot_loss_curve` turns the JSON lines into a PNG, and :func:`mfu`
relates measured throughput to the accelerator's dense peak from :data:`PEAK_TFLOPS`.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any, Self

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
# Keys every record carries; a metric with one of these names would silently overwrite it.
_RESERVED_KEYS = frozenset({"step", "split", "time"})


def _drop_partial_last_line(path: pathlib.Path) -> None:
    """Truncate ``path`` after its last newline.

    A crash mid-write leaves an incomplete record without a trailing newline; appending to it
    would glue the resumed run's first record onto the fragment and corrupt both.
    """
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _to_number(name: str, value: Any) -> int | float:
    """Convert a Python, numpy or JAX scalar to a plain ``int`` or ``float`` for JSON."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return int(arr.reshape(()))
    # float() also covers bool and ml_dtypes such as bfloat16, whose .item() is not a float.
    return float(arr.reshape(()))


class MetricsWriter:
    """Writes training metrics as JSON lines (metrics.jsonl) and TensorBoard events (tb/) under run_dir.

    Only one process of a multi-process run writes: ``enabled=False`` makes every method a
    no-op, so callers can pass ``enabled=jax.process_index() == 0`` and log unconditionally.
    Use as a context manager, or call :meth:`close` when done.
    """

    def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True):
        self.run_dir = pathlib.Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        # Imported here so that processes with logging disabled never load TensorBoard code.
        from tensorboardX import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if path.exists():
            _drop_partial_last_line(path)
        # Append: a resumed run continues the same file instead of losing its history.
        self._file = path.open("a", encoding="utf-8")
        self._tb = SummaryWriter(logdir=str(self.run_dir / TB_DIR))

    @property
    def path(self) -> pathlib.Path:
        """Location of the JSON lines file."""
        return self.run_dir / METRICS_FILE

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Record ``metrics`` for ``step`` under ``split`` (e.g. ``"train"`` or ``"eval"``).

        Values may be Python, numpy or JAX scalars. Non-finite values are kept (written as
        ``NaN``/``Infinity``, which Python's json reads back) because a diverging loss is
        exactly what one wants to see in the log.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        clash = _RESERVED_KEYS.intersection(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved for the record header")
        values = {name: _to_number(name, v) for name, v in metrics.items()}
        now = time.time()
        record = {"step": int(step), "split": split, "time": now, **values}
        self._file.write(json.dumps(record) + "\n")
        # Flushing per record means a crashed process loses nothing it already logged.
        self._file.flush()
        for name, value in values.items():
            self._tb.add_scalar(f"{split}/{name}", value, global_step=int(step), walltime=now)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Parse a metrics.jsonl file into a list of records, in file order.

    An unparsable last line (a write cut short by a crash) is skipped; an unparsable line
    anywhere else means the file is damaged and raises ``ValueError``.
    """
    path = pathlib.Path(path)
    lines = [(i, line) for i, line in enumerate(path.read_text("utf-8").splitlines(), 1) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if pos == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not a JSON record ({err})") from err
    return records


def loss_by_step(records: list[dict], split: str) -> tuple[list[int], list[float]]:
    """Steps and losses of ``split``, sorted by step.

    A resumed run repeats the steps logged after its last checkpoint; the later record wins,
    since it belongs to the run that continued.
    """
    latest = {r["step"]: r["loss"] for r in records if r.get("split") == split and "loss" in r}
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def plot_loss_curve(
    jsonl_path: str | pathlib.Path,
    png_path: str | pathlib.Path,
    *,
    title: str = "",
    log_y: bool = False,
) -> pathlib.Path:
    """Plot train loss against step, with held-out ("eval") loss as markers, to a PNG (``loss_figure``).

    ``title`` is also the PNG's ``Title`` text. Returns the PNG path. Raises ``ValueError`` if the
    file holds no loss values at all.
    """
    fig = loss_figure(read_metrics(jsonl_path), title=title, log_y=log_y, source=str(jsonl_path))
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120, metadata={"Title": title})
    return png_path


def loss_figure(records: list[dict], *, title: str = "", log_y: bool = False, source: str = "the records"):
    """The loss curve of ``records`` (``read_metrics``) as a matplotlib Figure.

    Line 0: every logged training loss from the first (the trainer logs step 1, the initial loss);
    markers: the held-out losses, each at the step of the network it scored (a DiLoCo row's
    ``anchor_step``: the outer parameters of that step).
    """
    # Figure + Agg canvas rather than pyplot: no global figure state, no GUI backend lookup.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train_steps, train_loss = loss_by_step(records, "train")
    eval_steps, eval_loss = loss_by_step(records, "eval")
    if not train_steps and not eval_steps:
        raise ValueError(f"{source}: no 'loss' values in the 'train' or 'eval' split to plot")
    anchors = {r["step"]: r["anchor_step"] for r in records if r.get("split") == "eval" and "anchor_step" in r}

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_steps:
        ax.plot(train_steps, train_loss, label="train", linewidth=1.2)
    if eval_steps:
        label = "held-out (outer parameters, at their step)" if anchors else "held-out"
        ax.plot([anchors.get(s, s) for s in eval_steps], eval_loss, "o", label=label, markersize=5)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


# Dense (no structured sparsity) peak TFLOPS per chip, keyed by a substring of JAX's
# ``Device.device_kind``. Sources: the NVIDIA H100, H200 and A100 Tensor Core GPU datasheets,
# which quote tensor-core figures "with sparsity"; those are halved here (H100 SXM bf16:
# 1,979 -> 989). "float32" is the TF32 tensor-core peak, because XLA runs float32 matmuls on
# TF32 tensor cores by default on these GPUs; the non-tensor-core FP32 peak (67 TFLOPS on
# H100 SXM) would overstate MFU. float16 peaks equal bfloat16 on all of these parts.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0},
    "H100 NVL": {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5},  # SXM5, e.g. "80GB HBM3"
    "H200 NVL": {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5},  # SXM: same compute as H100
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},  # SXM4 and PCIe alike
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOPS of one chip for ``dtype``, or ``None`` if the device or dtype is unknown.

    The longest matching key wins, so "NVIDIA H100 PCIe" gets the PCIe figures rather than
    the SXM ones. CPUs and unlisted accelerators return ``None``.
    """
    kind = device_kind.lower()
    matches = [key for key in PEAK_TFLOPS if key.lower() in kind]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(str(dtype))


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the chip's peak.

    Returns a fraction (1.0 = peak), or ``None`` when the peak is unknown.
    """
    if peak_tflops is None:
        return None
    if not (peak_tflops > 0 and math.isfinite(peak_tflops)):
        raise ValueError(f"peak_tflops must be a positive finite number, got {peak_tflops}")
    return tokens_per_second_per_device * flops_per_token / (peak_tflops * 1e12)
