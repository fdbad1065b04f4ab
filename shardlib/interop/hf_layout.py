"""Which Hugging Face Llama-family tensor is which shardlib parameter: one table, as data.

Each row names an HF tensor, the shardlib parameter path (as in
``nnx.to_pure_dict``, see ``shardlib/models/transformer.py``), and both layouts in
named axes. ``(heads head_dim)`` is one HF dimension holding heads x head_dim,
heads outer (how torch's ``Linear`` weight ``[out, in]`` stores q's output).
A shardlib layout starting with ``layer`` is a stack of the HF tensors
``model.layers.{i}...`` along a leading axis, one per layer. Import and export
derive every split, merge and transpose from these strings.

Fused parameters. Several rows may name one shardlib path: shardlib's
``layers/qkv`` holds HF's q_proj, k_proj and v_proj, and ``layers/gate_up``
gate_proj and up_proj. Their shardlib layout has one bracketed dimension,
the one they are concatenated along, in table order: ``[group]`` means the
row fills ``group`` entries of it (an axis of its HF tensor: q_proj's
``(kv_heads group head_dim)`` is ``(heads head_dim)`` with each kv head's
``group`` = heads / kv_heads query heads inside it, HF's ``repeat_kv``
order), ``[1]`` one entry the HF tensor has no axis for. So a kv head's
queries, key and value lie side by side (``shardlib.models.layers.BlockWeights``).

Rotary layout: HF Llama checkpoints store q and k with the rotate-half pairing
(channel i with i + head_dim/2; the Meta-to-HF conversion permuted them into it),
and ``shardlib.models.layers.apply_rope`` uses that same pairing and the same
frequencies ``theta ** (-2i / head_dim)``. So no column permutation is needed in
either direction (``ROTARY_PAIRING`` records the fact; a test shows the logits
match). A checkpoint in Meta's interleaved layout (i with i + 1) is not an HF one.

Qwen 2's q/k/v biases (``QKV_BIAS_TABLE``) fill ``layers/qkv_bias`` as the weights fill
``layers/qkv``, without the ``embed`` axis; Mistral and Llama 3 have Llama's tensors.

``python -m shardlib.interop.hf_layout`` prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

ROTARY_PAIRING = "rotate_half"  # both sides: no permutation of q/k columns on import or export
LAYER = "layer"  # the stacked axis of shardlib layouts; HF names carry it as {i}

# fmt: off
LLAMA_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # HF tensor                                          shardlib path       HF axes                            shardlib axes
    ("model.embed_tokens.weight",                        "embed/embedding",  "vocab embed",               "vocab embed"),
    ("model.layers.{i}.input_layernorm.weight",          "layers/attn_norm", "embed",                     "layer embed"),
    ("model.layers.{i}.self_attn.q_proj.weight",         "layers/qkv",       "(kv_heads group head_dim) embed", "layer embed kv_heads [group] head_dim"),
    ("model.layers.{i}.self_attn.k_proj.weight",         "layers/qkv",       "(kv_heads head_dim) embed",       "layer embed kv_heads [1] head_dim"),
    ("model.layers.{i}.self_attn.v_proj.weight",         "layers/qkv",       "(kv_heads head_dim) embed",       "layer embed kv_heads [1] head_dim"),
    ("model.layers.{i}.self_attn.o_proj.weight",         "layers/o",         "embed (heads head_dim)",          "layer heads head_dim embed"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm",  "embed",                           "layer embed"),
    ("model.layers.{i}.mlp.gate_proj.weight",            "layers/gate_up",   "mlp embed",                       "layer embed [1] mlp"),
    ("model.layers.{i}.mlp.up_proj.weight",              "layers/gate_up",   "mlp embed",                       "layer embed [1] mlp"),
    ("model.layers.{i}.mlp.down_proj.weight",            "layers/down",      "embed mlp",                       "layer mlp embed"),
    ("model.norm.weight",                                "final_norm",       "embed",                           "embed"),
    ("lm_head.weight",                                   "unembed",          "vocab embed",                     "embed vocab"),  # untied only
)
# Rows of a model with q/k/v biases (ModelConfig.qkv_bias: Qwen 2), after the v_proj row.
QKV_BIAS_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("model.layers.{i}.self_attn.q_proj.bias",           "layers/qkv_bias",  "(kv_heads group head_dim)",       "layer kv_heads [group] head_dim"),
    ("model.layers.{i}.self_attn.k_proj.bias",           "layers/qkv_bias",  "(kv_heads head_dim)",             "layer kv_heads [1] head_dim"),
    ("model.layers.{i}.self_attn.v_proj.bias",           "layers/qkv_bias",  "(kv_heads head_dim)",             "layer kv_heads [1] head_dim"),
)
# fmt: on
UNIT = "1"  # a fused dimension's entry that the HF tensor has no axis for: size 1
UNTIED_ONLY = frozenset({"unembed"})
# Tensors some HF checkpoints carry that hold no weights (recomputed from the config): skipped on import.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """One row of the table, parsed.

    hf_groups: the HF dimensions, each a tuple of axis names (outer first).
    axes: the shardlib dimensions of this row's block; ``stacked`` when the
      first is ``layer``. A fused row's bracketed dimension appears as its
      axis name (``group``, or ``UNIT`` for ``[1]``).
    fused: that axis, or None for a row that is a whole parameter.
    before: the fused axes of the earlier rows of the same parameter, in
      order: the row's entries start after theirs.
    """

    hf_name: str
    path: str
    hf_groups: tuple[tuple[str, ...], ...]
    axes: tuple[str, ...]
    fused: str | None = None
    before: tuple[str, ...] = ()

    @property
    def stacked(self) -> bool:
        return self.axes[0] == LAYER

    @property
    def per_layer_axes(self) -> tuple[str, ...]:
        """shardlib axes of this row's block in one layer's slice (without ``layer``)."""
        return self.axes[1:] if self.stacked else self.axes

    @property
    def fused_dim(self) -> int | None:
        """Index of the fused dimension among ``per_layer_axes``, or None."""
        return None if self.fused is None else self.per_layer_axes.index(self.fused)

    def fused_range(self, sizes: dict[str, int]) -> tuple[int, int]:
        """(start, stop) of this row's entries along the parameter's fused dimension."""
        start = sum(axis_size(sizes, a) for a in self.before)
        return start, start + axis_size(sizes, self.fused)  # type: ignore[arg-type]  # only fused rows have a range

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
    groups: list[tuple[str, ...]] = []
    current: list[str] | None = None  # the open "(" group's axes
    for token in spec.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            current = []
        elif token == ")":
            groups.append(tuple(current))  # type: ignore[arg-type]  # a ")" without "(": TypeError, as ever
            current = None
        elif current is not None:
            current.append(token)
        else:
            groups.append((token,))
    return tuple(groups)


def parse_axes(spec: str) -> tuple[tuple[str, ...], str | None]:
    """``"layer embed [1] mlp"`` -> ``(("layer", "embed", "1", "mlp"), "1")``: the axes and the fused one."""
    axes, fused = [], None
    for token in spec.split():
        if token.startswith("[") and token.endswith("]"):
            if fused is not None:
                raise ValueError(f"shardlib layout {spec!r} has more than one fused [dimension]")
            fused = token[1:-1]
            token = fused
        axes.append(token)
    return tuple(axes), fused


def table(qkv_bias: bool = False) -> tuple[tuple[str, str, str, str], ...]:
    """The rows of a model with or without q/k/v biases, in HF order (the biases after v_proj's weight)."""
    if not qkv_bias:
        return LLAMA_TABLE
    after = next(k for k, row in enumerate(LLAMA_TABLE) if row[0].endswith("v_proj.weight")) + 1
    return (*LLAMA_TABLE[:after], *QKV_BIAS_TABLE, *LLAMA_TABLE[after:])


def llama_layouts(tie_embeddings: bool, qkv_bias: bool = False) -> list[TensorLayout]:
    """The parsed rows that apply to a model with or without tied embeddings and q/k/v biases."""
    rows: list[TensorLayout] = []
    earlier: dict[str, tuple[str, ...]] = {}  # path -> the fused axes of its rows so far
    for hf, path, hf_axes, spec in table(qkv_bias):
        axes, fused = parse_axes(spec)
        before = earlier.get(path, ())
        if before and fused is None:
            raise ValueError(f"{path} is filled by several HF tensors, so each row needs a fused [dimension]")
        rows.append(TensorLayout(hf, path, parse_groups(hf_axes), axes, fused, before))
        # fused None: the parameter's only row (a later row of its path raises above before using it).
        earlier[path] = (*before, fused)  # type: ignore[arg-type]
    return [row for row in rows if not (tie_embeddings and row.path in UNTIED_ONLY)]


def model_layouts(model) -> list[TensorLayout]:
    """The parsed rows of ``model`` (a ``ModelConfig``)."""
    return llama_layouts(model.tie_embeddings, model.qkv_bias)


def parameters(layouts: list[TensorLayout]) -> dict[str, list[TensorLayout]]:
    """{shardlib path: its rows in table order}: one row, or the rows fused into it."""
    out: dict[str, list[TensorLayout]] = {}
    for layout in layouts:
        out.setdefault(layout.path, []).append(layout)
    return out


def axis_size(sizes: dict[str, int], axis: str) -> int:
    """The size of a named axis; ``UNIT`` is 1."""
    return 1 if axis == UNIT else sizes[axis]


def param_shape(rows: list[TensorLayout], sizes: dict[str, int]) -> tuple[int, ...]:
    """The shardlib parameter's shape (with ``layer`` when stacked) from its rows."""
    shape = [axis_size(sizes, a) for a in rows[0].axes]
    if rows[0].fused is not None:
        dim = rows[0].axes.index(rows[0].fused)
        shape[dim] = rows[-1].fused_range(sizes)[1]
    return tuple(shape)


def axis_sizes(model) -> dict[str, int]:
    """Size of every named axis of the table for ``model`` (a ``ModelConfig``)."""
    return {
        LAYER: model.n_layers,
        "vocab": model.vocab_size,
        "embed": model.d_model,
        "heads": model.n_heads,
        "kv_heads": model.n_kv_heads,
        "group": model.n_heads // model.n_kv_heads,  # query heads per kv head
        "head_dim": model.resolved_head_dim,
        "mlp": model.d_ff,
    }


def read_block(
    layout: TensorLayout,
    sizes: dict[str, int],
    ranges: dict[str, tuple[int, int]],
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> np.ndarray:
    """One layer's block of a row, read from its HF tensor.

    ``ranges`` gives (start, stop) of every per-layer shardlib axis of the
    row (a fused row's own axis included, in the row's own entries): the
    shard a device holds. ``read(slices)`` returns the HF tensor's ``[slices]``
    (``safetensors``' ``get_slice(name)[slices]``). Along a merged HF dimension
    such as ``(heads head_dim)`` the outer axis' range is read exactly and the
    inner axes whole, then cut: only a sharded ``head_dim`` makes it read more
    than the shard. Returns the block in ``layout.per_layer_axes`` order (a
    ``UNIT`` axis, absent from the HF tensor, of size 1).
    """
    slices: list[slice] = []
    shape: list[int] = []
    cut: list[slice] = []
    flat_axes: list[str] = []
    for group in layout.hf_groups:
        outer, inner = group[0], group[1:]
        start, stop = ranges[outer]
        inner_size = int(np.prod([sizes[a] for a in inner], dtype=np.int64))
        slices.append(slice(start * inner_size, stop * inner_size))
        shape += [stop - start, *(sizes[a] for a in inner)]
        cut += [slice(None), *(slice(*ranges[a]) for a in inner)]
        flat_axes += group
    block = np.asarray(read(tuple(slices))).reshape(shape)[tuple(cut)]
    own = [a for a in layout.per_layer_axes if a != UNIT]
    block = np.transpose(block, [flat_axes.index(a) for a in own])
    if UNIT in layout.per_layer_axes:
        block = np.expand_dims(block, layout.per_layer_axes.index(UNIT))
    return block


def read_param_block(
    rows: list[TensorLayout],
    sizes: dict[str, int],
    ranges: dict[str, tuple[int, int]],
    read: Callable[[TensorLayout, tuple[slice, ...]], np.ndarray],
) -> np.ndarray:
    """One layer's block of a shardlib parameter, from the HF tensors of its rows.

    ``ranges``: (start, stop) of every per-layer dimension of the parameter,
    by the first row's axis names (a fused dimension under the first row's
    fused axis); ``read(row, slices)`` reads the row's HF tensor. A fused
    parameter's block is its rows' blocks concatenated along the fused
    dimension, each row read only for the entries the range covers.
    """
    first = rows[0]
    if first.fused is None:
        return read_block(first, sizes, ranges, functools.partial(read, first))
    lo, hi = ranges[first.fused]
    blocks = []
    for row in rows:
        start, stop = row.fused_range(sizes)
        if max(lo, start) >= min(hi, stop):
            continue
        own = {a: r for a, r in ranges.items() if a != first.fused}
        # A fused parameter's rows are all fused: row.fused is not None.
        own[row.fused] = (max(lo, start) - start, min(hi, stop) - start)  # type: ignore[index]
        blocks.append(read_block(row, sizes, own, functools.partial(read, row)))
    return np.concatenate(blocks, axis=first.fused_dim)


def to_hf(layout: TensorLayout, block: np.ndarray, sizes: dict[str, int] | None = None) -> np.ndarray:
    """One layer's whole shardlib block (the parameter's, ``layout.per_layer_axes`` order) as the HF tensor.

    A fused row takes its own entries of the block first (``sizes`` gives their range).
    """
    if layout.fused is not None:
        if sizes is None:
            raise ValueError(f"{layout.hf_name} is part of fused {layout.path}: to_hf needs the axis sizes")
        start, stop = layout.fused_range(sizes)
        block = np.take(block, np.arange(start, stop), axis=layout.fused_dim)
        if layout.fused == UNIT:
            block = np.squeeze(block, axis=layout.fused_dim)
    flat_axes = [a for group in layout.hf_groups for a in group]
    own = [a for a in layout.per_layer_axes if a != UNIT]
    hf_order = np.transpose(block, [own.index(a) for a in flat_axes])
    return hf_order.reshape(layout.hf_shape(dict(zip(flat_axes, hf_order.shape, strict=True))))


def format_table() -> str:
    """The table as aligned text, for people."""
    header = ("HF tensor", "shardlib path", "HF axes", "shardlib axes")
    rows = [header, *table(qkv_bias=True)]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return (
        "\n".join(lines)
        + "\n(rows of one shardlib path are concatenated along its [bracketed] dimension, in this order;"
        + " group = heads / kv_heads; the .bias rows only with q/k/v biases, Qwen 2)"
        + f"\n(rotary pairing: {ROTARY_PAIRING} on both sides, no q/k permutation)"
    )


if __name__ == "__main__":
    print(format_table())
