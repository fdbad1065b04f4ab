"""Interoperation with other ecosystems: Hugging Face checkpoints (Llama 2/3, Mistral, Qwen 2) in and out.

* ``load_hf_params``: an HF checkpoint directory -> shardlib parameters on given shardings;
* ``export_hf``: shardlib parameters -> an HF directory (a run's checkpoint:
  ``shardlib.training.hf_export.export_run``, ``python -m shardlib.training.hf_export``);
* ``model_config_from_hf``: config.json -> ``ModelConfig``; ``hf_model_type``: the family an export is written as;
* ``LLAMA_TABLE``: the HF-name <-> shardlib-path table (``python -m shardlib.interop.hf_layout``).

This package imports only ``shardlib.core`` and ``shardlib.models`` (``ModelConfig`` is the
model's own); ``shardlib.training`` imports it (``init_from``, the export command), and
``shardlib.core``, ``shardlib.parallel`` and ``shardlib.models`` never do (tests/test_layering.py).
Names are imported on first use, so that ``python -m shardlib.interop.<module>`` runs its
module only once.
"""

import importlib

_EXPORTS = {
    "HFFormatError": "hf_config",
    "hf_config_from_model": "hf_config",
    "hf_model_type": "hf_config",
    "model_config_from_hf": "hf_config",
    "read_hf_config": "hf_config",
    "export_hf": "hf_export",
    "load_hf_params": "hf_import",
    "LLAMA_TABLE": "hf_layout",
    "QKV_BIAS_TABLE": "hf_layout",
    "format_table": "hf_layout",
    "initial_state": "init_from",
}
__all__ = [
    "LLAMA_TABLE",
    "QKV_BIAS_TABLE",
    "HFFormatError",
    "export_hf",
    "format_table",
    "hf_config_from_model",
    "hf_model_type",
    "initial_state",
    "load_hf_params",
    "model_config_from_hf",
    "read_hf_config",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
