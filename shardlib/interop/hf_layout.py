"""Which Hugging Face Llama tensor is which shardlib parameter: one table, as data.

Each row names an HF tensor, the shardlib parameter path (as in
``nnx.to_pure_dict``, see ``models/transformer.py``), and both layouts in
named axes. ``(heads head_dim)`` is one HF dimension holding heads x head_dim,
heads outer (how torch's ``Linear`` weight ``[out, in]`` stores q's output).
A shardlib layout starting with ``layer`` is a stack of the HF tensors
``model.layers.{i}...`` along a leading axis, one per layer. Import and export
derive every split, merge and transpose from these strings; a later layout
(fused q/k/v or gate/up, say) is a change to this table and to the code that
concatenates along one axis, nothing else.

Rotary layout: HF Llama checkpoints store q and k with the rotate-half pairing
(channel i with i + head_dim/2; the Meta-to-HF conversion permuted them into it),
and ``models.layers.apply_rope`` uses that same pairing and the same
frequencies ``theta ** (-2i / head_dim)``. So no column permutation is needed in
either direction (``ROTARY_PAIRING`` records the fact; a test shows the logits
match). A checkpoint in Meta's interleaved layout (i with i + 1) is not an HF one.

``python -m shardlib.interop.hf_layout`` prints the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

ROTARY_PAIRING = "rotate_half"  # both sides: no permutation of q/k columns on import or export
LAYER = "layer"  # the stacked axis of shardlib layouts; HF names carry it as {i}

# fmt: off
LLAMA_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # HF tensor                                          shardlib path       HF axes                      shardlib axes
    ("model.embed_tokens.weight",                        "embed/embedding",  "vocab embed",               "vocab embed"),
    ("model.layers.{i}.input_layernorm.weight",          "layers/attn_norm", "embed",                     "layer embed"),
    ("model.layers.{i}.self_attn.q_proj.weight",         "layers/q",         "(heads head_dim) embed",    "layer embed heads head_dim"),
    ("model.layers.{i}.self_attn.k_proj.weight",         "layers/k",         "(kv_heads head_dim) embed", "layer embed kv_heads head_dim"),
    ("model.layers.{i}.self_attn.v_proj.weight",         "layers/v",         "(kv_heads head_dim) embed", "layer embed kv_heads head_dim"),
    ("model.layers.{i}.self_attn.o_proj.weight",         "layers/o",         "embed (heads head_dim)",    "layer heads head_dim embed"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm",  "embed",                     "layer embed"),
    ("model.layers.{i}.mlp.gate_proj.weight",            "layers/gate",      "mlp embed",                 "layer embed mlp"),
    ("model.layers.{i}.mlp.up_proj.weight",              "layers/up",        "mlp embed",                 "layer embed mlp"),
    ("model.layers.{i}.mlp.down_proj.weight",            "layers/down",      "embed mlp",                 "layer mlp embed"),
    ("model.norm.weight",                                "final_norm",       "embed",                     "embed"),
    ("lm_head.weight",                                   "unembed",          "vocab embed",               "embed vocab"),  # untied only
)
# fmt: on
UNTIED_ONLY = frozenset({"unembed"})
# Tensors some HF checkpoints carry that hold no weights (recomputed from the config): skipped on import.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """One row of the table, parsed.

    hf_groups: the HF dimensions, each a tuple of axis names (outer first).
    axes: the shardlib dimensions; ``stacked`` when the first is ``layer``.
    """

    hf_name: str
    path: str
    hf_groups: tuple[tuple[str, ...], ...]
    axes: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return self.axes[0] == LAYER

    @property
    def per_layer_axes(self) -> tuple[str, ...]:
        """shardlib axes of one layer's slice (without ``layer``)."""
        return self.axes[1:] if self.stacked else self.axes

    def hf_names(self, n_layers: int) -> list[str]:
        """The HF tensor names of this row, layer 0 first for a stacked row."""
        if not self.stacked:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(n_layers)]

    def hf_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The HF tensor's shape, given the size of every named axis."""
        shape = []
        for group in self.hf_groups:
            n = 1
            for axis in group:
                n *= sizes[axis]
            shape.append(n)
        return tuple(shape)


def parse_groups(spec: str) -> tuple[tuple[str, ...], ...]:
    """``"(heads head_dim) embed"`` -> ``(("heads", "head_dim"), ("embed",))``."""
    groups, current = [], None
    for token in spec.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            current = []
        elif token == ")":
            groups.append(tuple(current))
            current = None
        elif current is not None:
            current.append(token)
        else:
            groups.append((token,))
    return tuple(groups)


def llama_layouts(tie_embeddings: bool) -> list[TensorLayout]:
    """The parsed rows that apply to a model with or without tied embeddings."""
    rows = [
        TensorLayout(hf, path, parse_groups(hf_axes), tuple(axes.split())) for hf, path, hf_axes, axes in LLAMA_TABLE
    ]
    return [row for row in rows if not (tie_embeddings and row.path in UNTIED_ONLY)]


def axis_sizes(model) -> dict[str, int]:
    """Size of every named axis of the table for ``model`` (a ``ModelConfig``)."""
    return {
        LAYER: model.n_layers,
        "vocab": model.vocab_size,
        "embed": model.d_model,
        "heads": model.n_heads,
        "kv_heads": model.n_kv_heads,
        "head_dim": model.resolved_head_dim,
        "mlp": model.d_ff,
    }


def read_block(
    layout: TensorLayout,
    sizes: dict[str, int],
    ranges: dict[str, tuple[int, int]],
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> np.ndarray:
    """One layer's block of a shardlib parameter, read from its HF tensor.

    ``ranges`` gives (start, stop) of every per-layer shardlib axis: the shard
    a device holds. ``read(slices)`` returns the HF tensor's ``[slices]``
    (``safetensors``' ``get_slice(name)[slices]``). Along a merged HF dimension
    such as ``(heads head_dim)`` the outer axis' range is read exactly and the
    inner axes whole, then cut: only a sharded ``head_dim`` makes it read more
    than the shard. Returns the block in ``layout.per_layer_axes`` order.
    """
    slices, shape, cut, flat_axes = [], [], [], []
    for group in layout.hf_groups:
        outer, inner = group[0], group[1:]
        start, stop = ranges[outer]
        inner_size = int(np.prod([sizes[a] for a in inner], dtype=np.int64))
        slices.append(slice(start * inner_size, stop * inner_size))
        shape += [stop - start, *(sizes[a] for a in inner)]
        cut += [slice(None), *(slice(*ranges[a]) for a in inner)]
        flat_axes += group
    block = np.asarray(read(tuple(slices))).reshape(shape)[tuple(cut)]
    return np.transpose(block, [flat_axes.index(a) for a in layout.per_layer_axes])


def to_hf(layout: TensorLayout, block: np.ndarray) -> np.ndarray:
    """One layer's whole shardlib block (``layout.per_layer_axes`` order) as the HF tensor."""
    flat_axes = [a for group in layout.hf_groups for a in group]
    hf_order = np.transpose(block, [layout.per_layer_axes.index(a) for a in flat_axes])
    sizes = dict(zip(flat_axes, hf_order.shape, strict=True))
    return hf_order.reshape(layout.hf_shape(sizes))


def format_table() -> str:
    """The table as aligned text, for people."""
    header = ("HF tensor", "shardlib path", "HF axes", "shardlib axes")
    rows = [header, *LLAMA_TABLE]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + f"\n(rotary pairing: {ROTARY_PAIRING} on both sides, no q/k permutation)"


if __name__ == "__main__":
    print(format_table())
