"""Hugging Face ``config.json`` <-> shardlib ``ModelConfig`` for Llama-family checkpoints.

Only what shardlib's transformer computes is accepted: a decoder with RMSNorm,
rotary embeddings without scaling, grouped-query attention and a SwiGLU MLP,
no biases. Anything else (another ``model_type``, ``rope_scaling``, attention or
MLP biases, another activation, a sliding window) is refused with an
:class:`HFFormatError` that names the key, never silently approximated.

Both config dialects are read: transformers 4 (``rope_theta``, ``rope_scaling``)
and transformers 5 (``rope_parameters``). Export writes both, so either loads it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from shardlib.models.config import ModelConfig

CONFIG_FILE = "config.json"
# model_type values whose checkpoints are laid out and computed like Llama (with the checks below).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# (HF key, value shardlib computes): a checkpoint with another value is refused.
REQUIRED_VALUES = (
    ("hidden_act", "silu"),
    ("attention_bias", False),
    ("mlp_bias", False),
    ("sliding_window", None),  # mistral: full causal attention only
)
# ModelConfig field -> the HF key it comes from (for messages); head_dim is compared resolved.
MATCHED_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("n_kv_heads", "num_key_value_heads"),
    ("resolved_head_dim", "head_dim"),
    ("d_ff", "intermediate_size"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
)


class HFFormatError(ValueError):
    """A Hugging Face checkpoint shardlib cannot use; the message names the file, key or tensor."""


def read_hf_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
    """The parsed ``config.json`` of checkpoint directory ``hf_dir``."""
    path = pathlib.Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise HFFormatError(f"{hf_dir} is not a Hugging Face checkpoint directory: it has no {CONFIG_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFFormatError(f"{path} is not valid JSON ({err})") from err


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """The rotary base; refuses any rope scaling (shardlib's rotary has none)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value:
            kind = value.get("rope_type", value.get("type", "default"))
            if kind != "default":
                raise HFFormatError(
                    f"{where}: {key} has rope_type {kind!r}; shardlib's rotary embedding supports only "
                    "'default' (no rope scaling)"
                )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """The ``ModelConfig`` equivalent to HF config dict ``hf``; HFFormatError naming any unsupported key.

    ``where`` names the file in messages. param/compute dtypes stay at their
    defaults (float32): they are a choice of the run, not of the checkpoint.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(
            f"{where}: model_type {model_type!r} is not supported; shardlib imports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key, wanted in REQUIRED_VALUES:
        if hf.get(key, wanted) != wanted:
            raise HFFormatError(f"{where}: {key} is {hf[key]!r}; shardlib's transformer only computes {key}={wanted!r}")
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if key not in hf]  # fmt: skip
    if missing:
        raise HFFormatError(f"{where}: missing {', '.join(missing)}")
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d_model // n_heads)
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=None if head_dim * n_heads == d_model else head_dim,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=_rope_theta(hf, where),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise HFFormatError(f"{where} describes a model shardlib cannot build: {err}") from err


def check_model_matches(model: ModelConfig, hf_model: ModelConfig, where: str) -> None:
    """Raises HFFormatError listing every field where the run's ``model`` differs from the checkpoint's.

    The message ends with the ``key=value`` overrides that make them agree.
    """
    if model.moe.n_experts:
        raise HFFormatError(f"{where}: a Llama checkpoint has no experts; set model.moe.n_experts=0 to import it")
    diffs = [
        (field, hf_key, getattr(model, field), getattr(hf_model, field))
        for field, hf_key in MATCHED_FIELDS
        if getattr(model, field) != getattr(hf_model, field)
    ]
    if not diffs:
        return
    listed = "; ".join(f"model.{f.removeprefix('resolved_')} is {a!r} but the checkpoint's {k} is {b!r}"
                       for f, k, a, b in diffs)  # fmt: skip
    fixes = [f"model.{f}={b}" for f, _, _, b in diffs if f != "resolved_head_dim"]
    if hf_model.head_dim != model.head_dim and any(f == "resolved_head_dim" for f, *_ in diffs):
        # A checkpoint whose head_dim is d_model // n_heads needs none set: the other overrides give it.
        fixes.append(f"model.head_dim={'null' if hf_model.head_dim is None else hf_model.head_dim}")
    fix = " ".join(fixes)
    raise HFFormatError(f"the model config does not match {where}: {listed}. Override with: {fix}")


def hf_config_from_model(
    model: ModelConfig, *, dtype: str, max_position_embeddings: int = 4096, extra: dict | None = None
) -> dict[str, Any]:
    """A ``LlamaForCausalLM`` config.json dict for ``model`` (dense only), tensors stored as ``dtype``.

    ``max_position_embeddings`` is only a declared limit (shardlib's rotary has
    none); ``extra`` adds keys such as ``bos_token_id``/``eos_token_id``.
    """
    if model.moe.n_experts:
        raise HFFormatError("a model with experts (model.moe.n_experts > 0) has no Llama equivalent to export to")
    theta = float(model.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.d_ff,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": theta,  # transformers 4
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # transformers 5
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": dtype,  # transformers 4; 5 reads "dtype"
        "dtype": dtype,
        **(extra or {}),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m shardlib.interop.hf_config DIR``: the ``model:`` section of a run config for checkpoint DIR."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("hf_dir")
    args = parser.parse_args(argv)
    model = model_config_from_hf(read_hf_config(args.hf_dir), f"{args.hf_dir}/{CONFIG_FILE}")
    shape = [f.removeprefix("resolved_") for f, _ in MATCHED_FIELDS]
    section = {key: value for key, value in model.model_dump().items() if key in shape and value is not None}
    print(yaml.safe_dump({"model": section}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
