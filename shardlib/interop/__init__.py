"""Interoperation with other ecosystems: Hugging Face checkpoints (Llama family) in and out.

* ``load_hf_params``: an HF checkpoint directory -> shardlib parameters on given shardings;
* ``export_hf`` / ``export_run``: shardlib parameters or a run's checkpoint -> an HF directory;
* ``model_config_from_hf``: config.json -> ``ModelConfig``;
* ``LLAMA_TABLE``: the HF-name <-> shardlib-path table (``python -m shardlib.interop.hf_layout``).

This package may import ``shardlib.core``, ``shardlib.training`` and ``shardlib.models``;
``shardlib.core`` and ``shardlib.parallel`` never import it. Names are imported on first
use, so that ``python -m shardlib.interop.<module>`` runs its module only once.
"""

import importlib

_EXPORTS = {
    "HFFormatError": "hf_config",
    "hf_config_from_model": "hf_config",
    "model_config_from_hf": "hf_config",
    "read_hf_config": "hf_config",
    "export_hf": "hf_export",
    "export_run": "hf_export",
    "load_hf_params": "hf_import",
    "LLAMA_TABLE": "hf_layout",
    "format_table": "hf_layout",
    "initial_state": "init_from",
}
__all__ = [
    "LLAMA_TABLE",
    "HFFormatError",
    "export_hf",
    "export_run",
    "format_table",
    "hf_config_from_model",
    "initial_state",
    "load_hf_params",
    "model_config_from_hf",
    "read_hf_config",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
