"""What every training step costs: communication, memory and FLOPs, compiled and predicted.

``python -m shardlib.analysis.report`` compiles the real train step of a config on a
mesh (emulated devices welcome; nothing runs) and sets what the compiled
program does beside the analytic model; ``python -m shardlib.analysis.planner`` uses the
model alone to pick a mesh for N devices. See docs/report.md.

Modules, one concern each:

* ``hlo``: read compiled HLO text (computations, shapes, loop trip counts);
* ``groups``: replica groups and source-target pairs -> mesh axes;
* ``patterns``: avoidable collectives (all-reduce then slice, summed addends, narrowed);
* ``collectives``: every collective with its bytes and runs per step;
* ``measure``: lower and compile the step from abstract inputs, and measure it;
* ``layout``: a config resolved on mesh axis sizes, without devices;
* ``analytic``: bytes per strategy and axis (``terms``: its ``Term``; builders in
  ``param_traffic``, ``activation_traffic``); ``compute``: FLOPs and the pipeline bubble;
  ``memory``: bytes per device;
* ``hardware``: profiles (``profiles/*.yaml``) and the step-time estimate;
* ``report``: the comparison; ``views`` / ``plots``: text, JSON, PNG.

Importing this package starts no JAX backend.
"""

from shardlib.analysis.report.analytic import predict_terms
from shardlib.analysis.report.collectives import Collective, find_collectives
from shardlib.analysis.report.hardware import Profile, estimate_time, load_profile
from shardlib.analysis.report.hlo import parse_hlo
from shardlib.analysis.report.layout import Layout, resolve_layout
from shardlib.analysis.report.measure import Measured, measure
from shardlib.analysis.report.memory import MemoryEstimate, estimate_memory
from shardlib.analysis.report.report import Report, build_report
from shardlib.analysis.report.terms import Term
from shardlib.analysis.report.views import format_report, report_json

__all__ = [
    "Collective",
    "Layout",
    "Measured",
    "MemoryEstimate",
    "Profile",
    "Report",
    "Term",
    "build_report",
    "estimate_memory",
    "estimate_time",
    "find_collectives",
    "format_report",
    "load_profile",
    "measure",
    "parse_hlo",
    "predict_terms",
    "report_json",
    "resolve_layout",
]
