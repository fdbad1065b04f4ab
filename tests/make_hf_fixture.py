"""Regenerates tests/fixtures/hf_tiny_llama/ with transformers and PyTorch on CPU (not needed by the suite).

Run it with an interpreter that has torch, transformers, safetensors and
tokenizers (kept out of shardlib's own environment), for example::

    python -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu  # or PyPI's wheel
    /tmp/hfvenv/bin/pip install transformers safetensors tokenizers
    /tmp/hfvenv/bin/python tests/make_hf_fixture.py

What it writes (seeded: the same versions write the same bytes):

* ``untied/``: a random ``LlamaForCausalLM`` (2 layers, d_model 64, 4 heads over
  2 kv heads, d_ff 128, vocab 256, rope_theta 50000, rms_norm_eps 1e-5, untied
  output), saved in bfloat16 with a 48 KB shard limit, so its weights come as
  several files and ``model.safetensors.index.json``; with a tiny BPE
  ``tokenizer.json`` (trained on the Zen of Python) and ``tokenizer_config.json``;
* ``tied/``: the same shape with ``tie_word_embeddings`` and d_ff 64, one ``model.safetensors``;
* ``reference.safetensors``: ``tokens`` [2, 16] int32 and each model's float32
  logits on them (``untied_logits``, ``tied_logits``, [2, 16, 256]), computed in
  float32 from the bfloat16 weights as stored (eager attention).

Weights are drawn N(0, 0.15^2) (norm scales 1 + N(0, 0.1^2)) rather than
HF's 0.02 so that attention is far from uniform: a wrong rotary or head layout
then changes the logits by far more than the test's tolerance.

``--families`` writes ``tests/fixtures/hf_families/`` instead (the Llama fixture is left
as it is), one tiny model per family shardlib imports beyond Llama 2, each of the shape
above with d_ff 64, saved in bfloat16 as one ``model.safetensors``:

* ``llama3/``: ``rope_scaling`` ``llama3`` (factor 8, low/high_freq_factor 1/4,
  original_max_position_embeddings 32: with head_dim 16 and rope_theta 50000 the
  8 frequencies fall in all three bands: 1 kept, 1 interpolated, 6 divided);
* ``qwen2/``: Qwen 2 with its q/k/v biases (drawn like the weights, not HF's zeros)
  and tied embeddings, rope_theta 1e6;
* ``mistral/``: Mistral with ``sliding_window`` 5 (shorter than the 16 tokens);
* ``reference.safetensors``: the same ``tokens`` and each family's float32 logits
  (``llama3_logits``, ``qwen2_logits``, ``mistral_logits``).

``--check-export DIR --variant untied|tied|llama3|qwen2|mistral`` loads a shardlib export with
transformers and prints its largest logits difference from the reference.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_tiny_llama"
FAMILIES_OUT = OUT.parent / "hf_families"
SHAPE = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VARIANTS = {
    "untied": {"intermediate_size": 128, "tie_word_embeddings": False, "max_shard_size": "48KB"},
    "tied": {"intermediate_size": 64, "tie_word_embeddings": True, "max_shard_size": "1MB"},
}


COMMON = {
    **SHAPE,
    "intermediate_size": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128,
    "bos_token_id": None,
    "eos_token_id": 1,
    "pad_token_id": None,
    "attn_implementation": "eager",
}
FAMILIES = {
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "tie_word_embeddings": False,
            "rope_theta": 50000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {"tie_word_embeddings": False, "rope_theta": 10000.0, "sliding_window": 5},
    ),
}


def randomize(model) -> None:
    """Weights and biases N(0, 0.15^2), norm scales 1 + N(0, 0.1^2), each rounded to bfloat16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # the values the bf16 files hold, exactly


def make_family(seed: int, family: str):
    config_cls, model_cls, settings = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **settings)).eval()
    randomize(model)
    return model


def generate_families() -> None:
    if FAMILIES_OUT.exists():
        shutil.rmtree(FAMILIES_OUT)
    FAMILIES_OUT.mkdir(parents=True)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    reference = {"tokens": tokens.to(torch.int32)}
    for seed, family in enumerate(FAMILIES, start=10):
        model = make_family(seed, family)
        reference[f"{family}_logits"] = logits_of(model, tokens).contiguous()
        model.to(torch.bfloat16).save_pretrained(FAMILIES_OUT / family)
        (FAMILIES_OUT / family / "generation_config.json").unlink(missing_ok=True)
    save_file(reference, str(FAMILIES_OUT / "reference.safetensors"))
    total = sum(p.stat().st_size for p in FAMILIES_OUT.rglob("*") if p.is_file())
    print(f"wrote {FAMILIES_OUT} ({total / 1024:.0f} KiB)")


def make_model(seed: int, intermediate_size: int, tie_word_embeddings: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        **SHAPE,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # the values the bf16 files hold, exactly
    return model


def make_tokenizer() -> Tokenizer:
    """A tiny BPE (vocabulary below 256) trained on the Zen of Python."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    zen = codecs.decode(this.s, "rot13")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([zen] * 4, trainer)
    return tokenizer


def logits_of(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens.long()).logits.float()


def generate() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    reference = {"tokens": tokens.to(torch.int32)}
    for seed, (variant, settings) in enumerate(VARIANTS.items()):
        settings = dict(settings)
        shard = settings.pop("max_shard_size")
        model = make_model(seed, **settings)
        reference[f"{variant}_logits"] = logits_of(model, tokens).contiguous()
        model.to(torch.bfloat16).save_pretrained(OUT / variant, max_shard_size=shard)
        (OUT / variant / "generation_config.json").unlink(missing_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save(str(OUT / "untied" / "tokenizer.json"))
    (OUT / "untied" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))
    save_file(reference, str(OUT / "reference.safetensors"))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


def check_export(path: pathlib.Path, variant: str) -> None:
    reference = load_file(str((FAMILIES_OUT if variant in FAMILIES else OUT) / "reference.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    expected = reference[f"{variant}_logits"]
    diff = (logits_of(model, reference["tokens"]) - expected).abs().max().item()
    print(f"{path}: max |logits - reference| = {diff:.3g} (reference scale {expected.abs().max().item():.3g})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-export", type=pathlib.Path)
    parser.add_argument("--variant", choices=sorted([*VARIANTS, *FAMILIES]), default="untied")
    parser.add_argument("--families", action="store_true", help="write tests/fixtures/hf_families/ only")
    args = parser.parse_args()
    if args.check_export:
        check_export(args.check_export, args.variant)
    elif args.families:
        generate_families()
    else:
        generate()
