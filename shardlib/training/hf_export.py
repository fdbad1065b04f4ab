"""Export a run's newest checkpoint as a Hugging Face Llama checkpoint: ``export_run`` and its command.

``python -m shardlib.training.hf_export --run-dir runs/x --out hf/x [--mesh M] [--devices N]`` restores
the newest complete checkpoint of a run onto its shardings (with the run's own ``config.json``) and
writes it with ``shardlib.interop.hf_export.export_hf``, in logical layer order. It lives here, not
in ``shardlib.interop``, because restoring a run is training's business: interop converts
parameters and imports only the core and the models; training imports interop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable, Sequence

import jax

from shardlib.core.mesh import build_mesh, load_mesh_spec, prepare_devices
from shardlib.interop.hf_export import DEFAULT_SHARD_BYTES, export_hf, parse_size
from shardlib.training.checkpoint import Checkpointer, restore_latest
from shardlib.training.cli import run_guarded
from shardlib.training.config import validate_config
from shardlib.training.data import tokenizer_files
from shardlib.training.setup import setup_training
from shardlib.training.state_layout import LAYER_ORDER, fuse_restored, restore_targets
from shardlib.training.train_state import abstract_state


def export_run(
    run_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    mesh: jax.sharding.Mesh,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> pathlib.Path:
    """Exports the newest complete checkpoint of ``run_dir`` (read with its ``config.json``) onto ``mesh``.

    Restores parameters and optimizer state onto the run's shardings on
    ``mesh`` (any mesh the config fits), then writes the parameters in logical
    layer order, and copies the run's tokenizer files if ``data.tokenizer`` names some.
    """
    run_dir = pathlib.Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a shardlib run directory")
    cfg = validate_config(json.loads(config_file.read_text()))
    run = setup_training(cfg, mesh)
    targets = abstract_state(run.model, run.tx, run.shardings)
    with Checkpointer(run_dir / "checkpoints", every=0, keep=cfg.checkpoint.keep, async_save=False) as ckpt:
        restored = restore_latest(
            ckpt, lambda meta: restore_targets(*targets, meta, run.compression), fallback=False, log=log
        )
    if restored is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint to export")
    step, params, _, meta = restored
    params, _ = fuse_restored(params, None, meta, log)  # a checkpoint from before the fused projections
    export_hf(
        params,
        cfg.model,
        out_dir,
        layer_order=meta.get(LAYER_ORDER),
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        max_position_embeddings=cfg.seq_len,
    )
    if cfg.data.tokenizer and jax.process_index() == 0:
        for path in tokenizer_files(cfg.data.tokenizer):
            shutil.copy(path, pathlib.Path(out_dir) / path.name)
    log(f"exported step {step} of {run_dir} to {out_dir}")
    return pathlib.Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shardlib.training.hf_export --run-dir runs/x --out hf/x [--mesh M] [--devices N]``."""
    parser = argparse.ArgumentParser(description="Export a shardlib run's newest checkpoint to Hugging Face format.")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True, help="directory for config.json and the safetensors files")
    parser.add_argument("--mesh", help="mesh YAML to restore onto; default: the run's `mesh`")
    parser.add_argument("--devices", type=int, help="emulate this many CPU devices")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="stored dtype; default: model.param_dtype")
    parser.add_argument("--max-shard-size", default="2GB", help="largest file, e.g. 500MB (default 2GB)")
    parser.add_argument("--traceback", action="store_true")
    args = parser.parse_args(argv)

    def run(args) -> int:
        config_file = pathlib.Path(args.run_dir) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{args.run_dir} holds no config.json: not a shardlib run directory")
        run_config = json.loads(config_file.read_text())
        spec = load_mesh_spec(args.mesh or run_config.get("mesh", "meshes/cpu-8.yaml"))
        if args.devices is not None:
            spec = dataclasses.replace(spec, platform="cpu", emulate_cpu_devices=args.devices)
        prepare_devices(spec)
        mesh = build_mesh(spec)
        with jax.set_mesh(mesh):
            export_run(args.run_dir, args.out, mesh, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size))
        return 0

    return run_guarded(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
