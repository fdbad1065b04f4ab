"""Hugging Face ``config.json`` <-> shardlib ``ModelConfig``: Llama 2/3, Mistral and Qwen 2 checkpoints.

Only what shardlib's transformer computes is accepted: a decoder with RMSNorm,
rotary embeddings, grouped-query attention and a SwiGLU MLP. Per family:

* ``llama`` (Llama 2, 3.x): rope scaling ``default`` or ``llama3`` (``ModelConfig.rope_scaling``);
* ``mistral``: ``sliding_window`` null or a window (``ModelConfig.sliding_window``);
* ``qwen2`` (Qwen 2, 2.5): q/k/v biases (``ModelConfig.qkv_bias``); a sliding window
  only when every layer has it (``use_sliding_window`` with ``max_window_layers`` 0).

Anything else (another ``model_type``, another rope scaling such as ``yarn``,
an o_proj or MLP bias, another activation, windows on some layers only) is
refused with an :class:`HFFormatError` that names the key, never silently
approximated. Both config dialects are read: transformers 4 (``rope_theta``,
``rope_scaling``) and transformers 5 (``rope_parameters``, ``layer_types``).
Export writes both, so either loads it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from shardlib.models.config import ModelConfig, RopeScaling

CONFIG_FILE = "config.json"
# model_type values shardlib imports: all laid out and computed like Llama, with the options below.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# (HF key, value shardlib computes): a checkpoint with another value is refused.
REQUIRED_VALUES = (
    ("hidden_act", "silu"),
    ("attention_bias", False),  # llama: q, k, v and o biases together (Qwen 2 has q/k/v only)
    ("mlp_bias", False),
)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers 5's layer_types
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
    ("rope_scaling", "rope_scaling"),
    ("qkv_bias", "q/k/v bias"),  # model_type qwen2
    ("sliding_window", "sliding_window"),
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


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(rotary base, Llama 3 scaling or None); refuses any other rope scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = None
    for key, value in (("rope_parameters", params), ("rope_scaling", hf.get("rope_scaling") or {})):
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise HFFormatError(
                f"{where}: {key} has rope_type {kind!r}; shardlib's rotary embedding supports "
                f"{' and '.join(repr(t) for t in SUPPORTED_ROPE_TYPES)} only"
            )
        if kind == "llama3" and scaling is None:
            fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [f for f in fields if f not in value]
            if missing:
                raise HFFormatError(f"{where}: {key} of rope_type 'llama3' has no {', '.join(missing)}")
            try:
                scaling = RopeScaling(**{f: value[f] for f in fields})
            except ValueError as err:
                raise HFFormatError(f"{where}: {key} is not a usable llama3 rope scaling: {err}") from err
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), scaling


def _sliding_window(hf: dict[str, Any], where: str) -> int | None:
    """The attention window every layer has, or None; refuses windows on some layers only."""
    n_layers = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2" and "layer_types" not in hf:  # transformers 4's Qwen 2
        if not hf.get("use_sliding_window") or window is None:
            return None
        first = int(hf.get("max_window_layers", n_layers))  # layers from this one on slide
        layer_types = [SLIDING if i >= first else FULL for i in range(n_layers)]
    else:
        layer_types = hf.get("layer_types") or [FULL if window is None else SLIDING] * n_layers
    kinds = set(layer_types)
    if not kinds <= {FULL, SLIDING}:
        raise HFFormatError(f"{where}: layer_types holds {sorted(kinds - {FULL, SLIDING})}; shardlib computes "
                            f"{FULL!r} and {SLIDING!r} only")  # fmt: skip
    if kinds == {FULL, SLIDING}:
        sliding = [i for i, kind in enumerate(layer_types) if kind == SLIDING]
        raise HFFormatError(
            f"{where}: only layers {sliding} of {n_layers} have a sliding window; shardlib's layers share one "
            "attention (a scan over one layer body), so it imports a window on every layer or on none"
        )
    if kinds == {SLIDING}:
        if window is None:
            raise HFFormatError(f"{where}: layer_types has sliding layers but sliding_window is null")
        return int(window)
    return None


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
    rope_theta, rope_scaling = _rope(hf, where)
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=None if head_dim * n_heads == d_model else head_dim,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qkv_bias=model_type == "qwen2",
            sliding_window=_sliding_window(hf, where),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise HFFormatError(f"{where} describes a model shardlib cannot build: {err}") from err


def _override(value: Any) -> str:
    """``value`` as an override's right-hand side (YAML, no spaces)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict | bool) or value is None else str(value)


def check_model_matches(model: ModelConfig, hf_model: ModelConfig, where: str) -> None:
    """Raises HFFormatError listing every field where the run's ``model`` differs from the checkpoint's.

    The message ends with the ``key=value`` overrides that make them agree.
    """
    if model.moe.n_experts:
        raise HFFormatError(f"{where}: a dense checkpoint has no experts; set model.moe.n_experts=0 to import it")
    diffs = [
        (field, hf_key, getattr(model, field), getattr(hf_model, field))
        for field, hf_key in MATCHED_FIELDS
        if getattr(model, field) != getattr(hf_model, field)
    ]
    if not diffs:
        return
    listed = "; ".join(f"model.{f.removeprefix('resolved_')} is {a!r} but the checkpoint's {k} is {b!r}"
                       for f, k, a, b in diffs)  # fmt: skip
    fixes = [f"model.{f}={_override(b)}" for f, _, _, b in diffs if f != "resolved_head_dim"]
    if hf_model.head_dim != model.head_dim and any(f == "resolved_head_dim" for f, *_ in diffs):
        # A checkpoint whose head_dim is d_model // n_heads needs none set: the other overrides give it.
        fixes.append(f"model.head_dim={'null' if hf_model.head_dim is None else hf_model.head_dim}")
    fix = " ".join(fixes)
    raise HFFormatError(f"the model config does not match {where}: {listed}. Override with: {fix}")


def hf_model_type(model: ModelConfig) -> str:
    """The family an export of ``model`` is written as: qwen2 with q/k/v biases, mistral with a window, else llama."""
    if model.qkv_bias:
        return "qwen2"
    return "mistral" if model.sliding_window is not None else "llama"


def _rope_parameters(model: ModelConfig) -> dict[str, Any]:
    theta = float(model.rope_theta)
    if model.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    return {**model.rope_scaling.model_dump(), "rope_theta": theta}


def hf_config_from_model(
    model: ModelConfig, *, dtype: str, max_position_embeddings: int = 4096, extra: dict | None = None
) -> dict[str, Any]:
    """A config.json dict for ``model`` (dense only) as ``hf_model_type`` says, tensors stored as ``dtype``.

    ``max_position_embeddings`` is only a declared limit (shardlib's rotary has
    none); ``extra`` adds keys such as ``bos_token_id``/``eos_token_id``.
    ``model_config_from_hf`` of the result gives ``model`` back (dtypes aside).
    """
    if model.moe.n_experts:
        raise HFFormatError(
            "a model with experts (model.moe.n_experts > 0) has no Hugging Face equivalent to export to"
        )
    model_type = hf_model_type(model)
    rope = _rope_parameters(model)
    window = model.sliding_window
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
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
        "rope_theta": rope["rope_theta"],  # transformers 4
        "rope_scaling": None if model.rope_scaling is None else rope,
        "rope_parameters": rope,  # transformers 5
        "attention_dropout": 0.0,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": dtype,  # transformers 4; 5 reads "dtype"
        "dtype": dtype,
    }
    if model_type == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    elif model_type == "mistral":
        config |= {"sliding_window": window}
    else:  # qwen2: a window on every layer is use_sliding_window with max_window_layers 0
        config |= {
            "use_sliding_window": window is not None,
            "sliding_window": window,
            "max_window_layers": 0 if window is not None else model.n_layers,
            "layer_types": [FULL if window is None else SLIDING] * model.n_layers,
        }
    return config | (extra or {})


def main(argv: list[str] | None = None) -> int:
    """``python -m shardlib.interop.hf_config DIR``: the ``model:`` section of a run config for checkpoint DIR."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("hf_dir")
    args = parser.parse_args(argv)
    model = model_config_from_hf(read_hf_config(args.hf_dir), f"{args.hf_dir}/{CONFIG_FILE}")
    shape = [f.removeprefix("resolved_") for f, _ in MATCHED_FIELDS]
    defaults = {"qkv_bias": False}  # printed only where the checkpoint has them
    section = {
        key: value
        for key, value in model.model_dump().items()
        if key in shape and value is not None and not (key in defaults and value == defaults[key])
    }
    print(yaml.safe_dump({"model": section}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
