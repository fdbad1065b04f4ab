"""Command-line entry points shared by ``train.py`` (``shardlib train``) and the analysis commands.

A user's mistake (a bad config key, a mesh that does not fit the devices, a
dimension that does not divide, an unwritable run directory or one that holds
a run of another config) and a checkpoint that cannot be used or written (a
corrupt file, a full disk) end with one ``error:`` line and exit status 2,
not a traceback; ``--traceback`` shows it. Orbax's own tracebacks are held
back (``shardlib.training.checkpoint``). A run that diverged (NaN or Inf loss) ends with
status 3, one that lost a peer process with status 4 (``shardlib.training.faults``). A
run stopped by SIGTERM or SIGINT saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax

from shardlib.cluster.elastic import elastic_requested, resize_for_processes
from shardlib.cluster.join import join, join_settings
from shardlib.cluster.watchdog import PeerWatchdog
from shardlib.core.mesh import MeshSpec, build_mesh, load_mesh_spec, prepare_devices
from shardlib.training.checkpoint import CheckpointError
from shardlib.training.config import Config, load_config
from shardlib.training.faults import EXIT_DIVERGED, RunDirError, TrainingDiverged

# Errors a user can fix from the command line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, RunDirError)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --mesh, --devices, the multi-process flags, --traceback and key=value overrides."""
    parser.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    parser.add_argument("--mesh", help="mesh YAML (meshes/*.yaml); default: the config's `mesh` key")
    parser.add_argument(
        "--devices",
        type=int,
        help="emulate this many CPU devices and build the mesh on them (overrides the mesh file's platform)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run through jax.distributed: the cluster is detected (SLURM, Open MPI, "
        "Kubernetes, TPU) unless --coordinator/--num-processes/--process-id are given; under srun with "
        "several tasks this is automatic",
    )
    parser.add_argument(
        "--coordinator",
        help="host:port of process 0's coordination service (implies --distributed; env JAX_COORDINATOR_ADDRESS)",
    )
    parser.add_argument("--num-processes", type=int, help="processes in the run (env JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="this process's index, 0-based (env JAX_PROCESS_ID)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200")


def load_run(args: argparse.Namespace) -> tuple[Config, MeshSpec]:
    """Config with overrides, and the mesh spec (from --mesh or the config).

    Emulated CPU devices are configured here, before anything touches a
    device, because JAX fixes the device count when its backend starts.
    """
    cfg = load_config(args.config, args.overrides)
    spec = load_mesh_spec(args.mesh or cfg.mesh)
    if args.devices is not None:
        spec = dataclasses.replace(spec, platform="cpu", emulate_cpu_devices=args.devices)
    prepare_devices(spec)
    settings = join_settings(
        distributed=args.distributed,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    if settings is not None:
        # Before the first device use: the runtime decides which devices are global.
        join(settings, cfg.faults.peer_timeout_s, run_dir=cfg.run_dir)  # the runtime's output: run_dir/logs
    return cfg, spec


def run_guarded(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs ``main``; user errors become one line on stderr and exit status 2."""
    try:
        return main(args)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        print("(run with --traceback for the full trace)", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        if args.traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from shardlib.training.trainer import train  # after load_run: importing is safe, but keep startup cheap

    cfg, spec = load_run(args)
    if args.restart:
        cfg = _restarted(cfg)
    if elastic_requested(args.elastic):  # the mesh and grad_accum for the processes there are
        cfg, spec, resized = resize_for_processes(cfg, spec, jax.process_count())
        if resized and jax.process_index() == 0:
            print(resized, flush=True)
    mesh = build_mesh(spec)
    watchdog = PeerWatchdog(
        cfg.faults.peer_timeout_s,
        not_peer_failures=(TrainingDiverged, RunDirError),
        checkpoints=pathlib.Path(cfg.run_dir) / "checkpoints",
    )
    with watchdog, jax.set_mesh(mesh):
        train(cfg, mesh, stop_at=args.stop_at, progress=not args.no_progress)
    return 0


def _restarted(cfg: Config) -> Config:
    """``cfg`` in a fresh run directory (``--restart``); the old one is left exactly as it is."""
    from shardlib.training.run_guard import restart_run_dir

    old = pathlib.Path(cfg.run_dir)
    new = restart_run_dir(old)
    if new != old:
        print(f"--restart: starting over in {new} ({old} is left as it is)", flush=True)
    return cfg.model_copy(update={"run_dir": str(new)})


class _HelpConfig(argparse.Action):
    """``--help-config``: prints every config key (``shardlib.training.config_help``) and exits 0, like ``--help``."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from shardlib.training.config_help import format_config_help

        print(format_config_help())
        parser.exit()


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python train.py --config configs/X.yaml --mesh meshes/Y.yaml [key=value ...]`` (``shardlib train``)."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a transformer with shardlib.",
        epilog="Every config key with its type, default and meaning: --help-config.",
    )
    parser.add_argument(
        "--help-config", action=_HelpConfig, help="print every config key with its type, default and meaning, and exit"
    )
    add_run_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument(
        "--stop-at", type=int, metavar="STEP", help="stop after this step with a checkpoint, as if preempted"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start over in a new run directory beside run_dir (run_dir-2, ...) if run_dir is in use; "
        "nothing is deleted. Without it, a run_dir that holds a run of another model, data or seed is an error",
    )
    parser.add_argument(
        "--elastic",
        action="store_true",
        help="the mesh file is the run at full size: on fewer (or more) processes, data_replica or data across "
        "hosts takes the processes there are and grad_accum keeps the global batch (docs/multihost.md; "
        "set by `shardlib launch --elastic`)",
    )
    return run_guarded(_train, parser.parse_args(argv))
