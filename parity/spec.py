"""The weight-mapping spec: every tensor of PaliGemma once, as data, and the interpreter that reads it.

Canonical form = the big_vision / Kaggle npz layout without the `params/` prefix: layers stacked on a leading
depth axis (Lv for the ViT, L for the LLM), einsum-shaped attention kernels, `qkv_einsum` when K == N.
Both implementations name their parameters with these keys, so loading needs no renames.

A row of TABLE reads:
    Row(npz key, canonical shape, Hugging Face on-disk key(s), ops, when)
- shape: axis letters from `parity.config` (products like `K*H` allowed);
- the leading L/Lv axis of a layered tensor is sliced per layer: its HF keys hold `{i}`;
- several HF keys: the per-layer tensor is split along its first axis, one piece per key (kv, qkv, gating);
- ops: applied in order to each piece to get the HF tensor; each has a derived inverse:
      "T a b c"   transpose with permutation (a, b, c)
      "R X Y"     reshape to (X, Y) (axis expressions)
      "PAD Vhf"   append rows up to Vhf rows (HF vocabulary padding; the inverse drops them: the one lossy step)
- when: the row exists only for configs where this predicate holds (see WHEN).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import numpy as np

from parity.config import PaliGemmaConfig

VIT = "vision_tower.vision_model"
ENC = f"{VIT}.encoder.layers.{{i}}"
LM = "language_model.model"
BLK = "img/Transformer/encoderblock"
MHA = f"{BLK}/MultiHeadDotProductAttention_0"


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    shape: tuple[str, ...]
    hf: tuple[str, ...]
    ops: tuple[str, ...] = ()
    when: str = "always"


def _r(key: str, shape: str, hf: str, ops: str = "", when: str = "always") -> Row:
    return Row(
        key, tuple(shape.split()), tuple(hf.split()), tuple(o.strip() for o in ops.split(";") if o.strip()), when
    )


# fmt: off
TABLE: tuple[Row, ...] = (
    # ---- SigLIP vision tower --------------------------------------------------------------------------------
    _r("img/embedding/kernel",     "P P 3 Dv",   f"{VIT}.embeddings.patch_embedding.weight",  "T 3 2 0 1"),
    _r("img/embedding/bias",       "Dv",         f"{VIT}.embeddings.patch_embedding.bias"),
    _r("img/pos_embedding",        "1 T Dv",     f"{VIT}.embeddings.position_embedding.weight", "R T Dv"),
    _r(f"{BLK}/LayerNorm_0/scale", "Lv Dv",      f"{ENC}.layer_norm1.weight"),
    _r(f"{BLK}/LayerNorm_0/bias",  "Lv Dv",      f"{ENC}.layer_norm1.bias"),
    _r(f"{MHA}/query/kernel",      "Lv Dv Nv Hv", f"{ENC}.self_attn.q_proj.weight", "R Dv Nv*Hv; T 1 0"),
    _r(f"{MHA}/query/bias",        "Lv Nv Hv",   f"{ENC}.self_attn.q_proj.bias",    "R Nv*Hv"),
    _r(f"{MHA}/key/kernel",        "Lv Dv Nv Hv", f"{ENC}.self_attn.k_proj.weight", "R Dv Nv*Hv; T 1 0"),
    _r(f"{MHA}/key/bias",          "Lv Nv Hv",   f"{ENC}.self_attn.k_proj.bias",    "R Nv*Hv"),
    _r(f"{MHA}/value/kernel",      "Lv Dv Nv Hv", f"{ENC}.self_attn.v_proj.weight", "R Dv Nv*Hv; T 1 0"),
    _r(f"{MHA}/value/bias",        "Lv Nv Hv",   f"{ENC}.self_attn.v_proj.bias",    "R Nv*Hv"),
    _r(f"{MHA}/out/kernel",        "Lv Nv Hv Dv", f"{ENC}.self_attn.out_proj.weight", "R Nv*Hv Dv; T 1 0"),
    _r(f"{MHA}/out/bias",          "Lv Dv",      f"{ENC}.self_attn.out_proj.bias"),
    _r(f"{BLK}/LayerNorm_1/scale", "Lv Dv",      f"{ENC}.layer_norm2.weight"),
    _r(f"{BLK}/LayerNorm_1/bias",  "Lv Dv",      f"{ENC}.layer_norm2.bias"),
    _r(f"{BLK}/MlpBlock_0/Dense_0/kernel", "Lv Dv Fv", f"{ENC}.mlp.fc1.weight", "T 1 0"),
    _r(f"{BLK}/MlpBlock_0/Dense_0/bias",   "Lv Fv",    f"{ENC}.mlp.fc1.bias"),
    _r(f"{BLK}/MlpBlock_0/Dense_1/kernel", "Lv Fv Dv", f"{ENC}.mlp.fc2.weight", "T 1 0"),
    _r(f"{BLK}/MlpBlock_0/Dense_1/bias",   "Lv Dv",    f"{ENC}.mlp.fc2.bias"),
    _r("img/Transformer/encoder_norm/scale", "Dv",   f"{VIT}.post_layernorm.weight"),
    _r("img/Transformer/encoder_norm/bias",  "Dv",   f"{VIT}.post_layernorm.bias"),
    # ---- linear projector (big_vision: the ViT's `head`) ---------------------------------------------------
    _r("img/head/kernel",          "Dv D",       "multi_modal_projector.linear.weight", "T 1 0"),
    _r("img/head/bias",            "D",          "multi_modal_projector.linear.bias"),
    # ---- Gemma / Gemma 2 decoder ---------------------------------------------------------------------------
    _r("llm/embedder/input_embedding", "V D",    f"{LM}.embed_tokens.weight", "PAD Vhf"),
    _r("llm/layers/pre_attention_norm/scale", "L D", f"{LM}.layers.{{i}}.input_layernorm.weight"),
    _r("llm/layers/attn/q_einsum/w", "L N D H",  f"{LM}.layers.{{i}}.self_attn.q_proj.weight",
       "T 0 2 1; R N*H D", when="separate_qkv"),
    _r("llm/layers/attn/kv_einsum/w", "L 2 K D H",
       f"{LM}.layers.{{i}}.self_attn.k_proj.weight {LM}.layers.{{i}}.self_attn.v_proj.weight",
       "T 0 2 1; R K*H D", when="separate_qkv"),
    _r("llm/layers/attn/qkv_einsum/w", "L 3 N D H",
       f"{LM}.layers.{{i}}.self_attn.q_proj.weight {LM}.layers.{{i}}.self_attn.k_proj.weight "
       f"{LM}.layers.{{i}}.self_attn.v_proj.weight", "T 0 2 1; R N*H D", when="fused_qkv"),
    _r("llm/layers/attn/attn_vec_einsum/w", "L N H D", f"{LM}.layers.{{i}}.self_attn.o_proj.weight",
       "T 2 0 1; R D N*H"),
    # Name collision: HF Gemma 1 calls the pre-FFW norm `post_attention_layernorm`.
    _r("llm/layers/pre_ffw_norm/scale", "L D",   f"{LM}.layers.{{i}}.post_attention_layernorm.weight", when="gemma1"),
    _r("llm/layers/pre_ffw_norm/scale", "L D",   f"{LM}.layers.{{i}}.pre_feedforward_layernorm.weight", when="gemma2"),
    _r("llm/layers/post_attention_norm/scale", "L D", f"{LM}.layers.{{i}}.post_attention_layernorm.weight",
       when="gemma2"),
    _r("llm/layers/post_ffw_norm/scale", "L D",  f"{LM}.layers.{{i}}.post_feedforward_layernorm.weight", when="gemma2"),
    _r("llm/layers/mlp/gating_einsum", "L 2 D F",
       f"{LM}.layers.{{i}}.mlp.gate_proj.weight {LM}.layers.{{i}}.mlp.up_proj.weight", "T 1 0"),
    _r("llm/layers/mlp/linear", "L F D",         f"{LM}.layers.{{i}}.mlp.down_proj.weight", "T 1 0"),
    _r("llm/final_norm/scale", "D",              f"{LM}.norm.weight"),
)
# fmt: on

WHEN: dict[str, Callable[[PaliGemmaConfig], bool]] = {
    "always": lambda c: True,
    "gemma1": lambda c: not c.text.gemma2,
    "gemma2": lambda c: c.text.gemma2,
    "fused_qkv": lambda c: c.text.fused_qkv,
    "separate_qkv": lambda c: not c.text.fused_qkv,
}

# Prefix of released Kaggle npz keys; files saved from the fine-tuning notebooks omit it.
NPZ_PREFIX = "params/"


# -- axis expressions -----------------------------------------------------------------------------------------
def eval_dim(expr: str, symbols: dict[str, int]) -> int:
    """`K*H` -> K times H; integers stand for themselves."""
    out = 1
    for part in expr.split("*"):
        if re.fullmatch(r"\d+", part):
            out *= int(part)
        elif part in symbols:
            out *= symbols[part]
        else:
            raise ValueError(f"unknown axis letter {part!r} in {expr!r}")
    return out


def eval_shape(exprs: tuple[str, ...], symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(e, symbols) for e in exprs)


# -- the primitives and their inverses ------------------------------------------------------------------------
def transpose_copy(x: np.ndarray, perm: tuple[int, ...], block: int = 256) -> np.ndarray:
    """np.ascontiguousarray(np.transpose(x, perm)), copied in cache-sized tiles (4-5x faster on large 2-D
    weights than numpy's strided copy, which the converters' throughput depends on)."""
    y = np.transpose(x, perm)
    a = list(perm).index(x.ndim - 1)  # the output axis fed by the input's contiguous axis
    if y.ndim < 2 or a == y.ndim - 1 or y.size < (1 << 16):
        return np.ascontiguousarray(y)
    out = np.empty(y.shape, y.dtype)
    for i in range(0, y.shape[a], block):
        for j in range(0, y.shape[-1], block):
            sl = [slice(None)] * y.ndim
            sl[a], sl[-1] = slice(i, i + block), slice(j, j + block)
            out[tuple(sl)] = y[tuple(sl)]
    return out


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # "T", "R" or "PAD"
    args: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def apply(self, x: np.ndarray, pad_rows: np.ndarray | None = None) -> np.ndarray:
        assert x.shape == self.in_shape, (self.kind, x.shape, self.in_shape)
        if self.kind == "T":
            return transpose_copy(x, self.args)
        if self.kind == "R":
            return np.ascontiguousarray(x).reshape(self.out_shape)
        if pad_rows is None:  # PAD
            raise ValueError("PAD needs the padding rows")
        return np.concatenate([x, np.broadcast_to(pad_rows, (self.out_shape[0] - x.shape[0],) + x.shape[1:])])

    def invert(self, y: np.ndarray) -> np.ndarray:
        assert y.shape == self.out_shape, (self.kind, y.shape, self.out_shape)
        if self.kind == "T":
            return transpose_copy(y, tuple(int(a) for a in np.argsort(self.args)))
        if self.kind == "R":
            return np.ascontiguousarray(y).reshape(self.in_shape)
        return y[: self.in_shape[0]]


def _parse_op(text: str, in_shape: tuple[int, ...], symbols: dict[str, int]) -> Op:
    kind, *args = text.split()
    if kind == "T":
        perm = tuple(int(a) for a in args)
        if sorted(perm) != list(range(len(in_shape))):
            raise ValueError(f"bad permutation {perm} for shape {in_shape}")
        return Op("T", perm, in_shape, tuple(in_shape[p] for p in perm))
    if kind == "R":
        out = tuple(eval_dim(a, symbols) for a in args)
        if int(np.prod(out)) != int(np.prod(in_shape)):
            raise ValueError(f"cannot reshape {in_shape} to {out}")
        return Op("R", out, in_shape, out)
    if kind == "PAD":
        rows = eval_dim(args[0], symbols)
        return Op("PAD", (rows,), in_shape, (rows,) + in_shape[1:])
    raise ValueError(f"unknown op {text!r}")


# -- rows bound to a config ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """A row of TABLE resolved against one config."""

    key: str  # canonical = npz key without `params/`
    shape: tuple[int, ...]  # canonical (stacked) shape
    layers: int | None  # depth of the leading stacked axis, None if not layered
    hf_templates: tuple[str, ...]
    ops: tuple[Op, ...]  # applied to each per-layer piece

    @property
    def piece_shape(self) -> tuple[int, ...]:
        """Shape of one per-layer piece before the ops."""
        s = self.shape[1:] if self.layers is not None else self.shape
        return s[1:] if len(self.hf_templates) > 1 else s

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.ops[-1].out_shape if self.ops else self.piece_shape

    @property
    def lossy(self) -> bool:
        return any(op.kind == "PAD" for op in self.ops)

    def hf_keys(self) -> Iterator[tuple[str, tuple[int | None, int | None]]]:
        """Every HF key with its (layer, piece) address in the canonical tensor."""
        for i in range(self.layers) if self.layers is not None else [None]:
            for j, t in enumerate(self.hf_templates):
                yield (t.format(i=i) if i is not None else t), (i, j if len(self.hf_templates) > 1 else None)

    def index(self, addr: tuple[int | None, int | None]) -> tuple[int, ...]:
        """The leading indices of the canonical tensor that hold one HF tensor."""
        return tuple(a for a in addr if a is not None)

    def to_hf(self, piece: np.ndarray, pad_rows: np.ndarray | None = None) -> np.ndarray:
        for op in self.ops:
            piece = op.apply(piece, pad_rows)
        return np.ascontiguousarray(piece)

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        if tensor.shape != self.hf_shape:
            raise ValueError(f"{self.key}: HF tensor has shape {tensor.shape}, expected {self.hf_shape}")
        for op in reversed(self.ops):
            tensor = op.invert(tensor)
        return np.ascontiguousarray(tensor)


def entries(config: PaliGemmaConfig) -> list[Entry]:
    """TABLE resolved for `config`, in table order."""
    sym = config.symbols()
    out = []
    for row in TABLE:
        if not WHEN[row.when](config):
            continue
        shape = eval_shape(row.shape, sym)
        layers = shape[0] if row.shape[0] in ("L", "Lv") else None
        piece = shape[1:] if layers is not None else shape
        if len(row.hf) > 1:
            if piece[0] != len(row.hf):
                raise ValueError(f"{row.key}: split axis has {piece[0]} entries for {len(row.hf)} HF keys")
            piece = piece[1:]
        ops = []
        for text in row.ops:
            op = _parse_op(text, piece, sym)
            ops.append(op)
            piece = op.out_shape
        out.append(Entry(row.key, shape, layers, row.hf, tuple(ops)))
    return out


def canonical_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    return {e.key: e.shape for e in entries(config)}


def hf_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    return {k: e.hf_shape for e in entries(config) for k, _ in e.hf_keys()}


def param_count(config: PaliGemmaConfig) -> int:
    """Parameters of the canonical (npz) form: the published counts."""
    return sum(int(np.prod(s)) for s in canonical_shapes(config).values())


class MeanRow:
    """The deterministic HF vocabulary padding row: the mean of all real embedding rows (float64 sums of row
    blocks, cast back to the table dtype). Fed block by block so the converters need one pass over the table.

    A mean row's logit is the mean of the real logits, so a padded id can never win an argmax.
    """

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.rows = 0

    def add(self, block: np.ndarray) -> None:
        s = block.sum(axis=0, dtype=np.float64)
        self.total = s if self.total is None else self.total + s
        self.rows += block.shape[0]

    def value(self, dtype) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return (self.total / self.rows).astype(dtype)


def pad_rows_for(embedding: np.ndarray) -> np.ndarray:
    """MeanRow of a whole in-memory table."""
    m = MeanRow()
    m.add(embedding)
    return m.value(embedding.dtype)


# -- whole-dict conversions (in memory; the streaming converters use Entry piece by piece) -------------------
def to_hf(config: PaliGemmaConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for e in entries(config):
        x = params[e.key]
        if x.shape != e.shape:
            raise ValueError(f"{e.key}: shape {x.shape}, expected {e.shape} for {config.name}")
        pad = pad_rows_for(x) if e.lossy else None
        for hf_key, addr in e.hf_keys():
            out[hf_key] = e.to_hf(x[e.index(addr)], pad)
    return out


def from_hf(config: PaliGemmaConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for e in entries(config):
        pieces: dict[tuple, np.ndarray] = {addr: e.from_hf(tensors[k]) for k, addr in e.hf_keys()}
        out[e.key] = assemble(e, pieces)
    return out


def assemble(e: Entry, pieces: dict[tuple[int | None, int | None], np.ndarray]) -> np.ndarray:
    """Stack per-(layer, piece) canonical pieces back into the canonical tensor."""

    def layer(i):
        if len(e.hf_templates) > 1:
            return np.stack([pieces[(i, j)] for j in range(len(e.hf_templates))])
        return pieces[(i, None)]

    if e.layers is None:
        return layer(None)
    return np.stack([layer(i) for i in range(e.layers)])


def random_params(
    config: PaliGemmaConfig, seed: int = 0, dtype=np.float32, scale: float | None = None, weights: str | None = None
) -> dict[str, np.ndarray]:
    """Deterministic random canonical parameters (tests and the shipped tiny checkpoint), generated from the spec.
    `weights`: "realistic" (the default: per-leaf statistics like a release's, `parity.synthetic`) or "chaotic"
    (every leaf N(0, scale^2), scale 0.3 by default); an explicit `scale` alone means chaotic, as it always did."""
    from parity import synthetic

    weights, scale = synthetic.resolve(weights, scale)
    rng = np.random.default_rng(seed)
    return {
        e.key: synthetic.draw(
            rng, e.key, e.shape, synthetic.piece_shape(e.key, e.shape, e.layers is not None), weights, scale
        ).astype(dtype)
        for e in entries(config)
    }


def check_params(config: PaliGemmaConfig, params, source: str = "params") -> None:
    """Raise CheckpointError naming the first missing, unexpected or wrong-shape key (both implementations' loaders
    call this before touching a model)."""
    from parity.errors import CheckpointError, describe

    expected = canonical_shapes(config)
    for key, shape in expected.items():
        if key not in params:
            raise CheckpointError(describe(source, key, shape, "nothing", f"missing parameter for {config.name}"))
        found = tuple(np.shape(params[key]))
        if found != shape:
            raise CheckpointError(describe(source, key, shape, found, f"wrong shape for {config.name}"))
    for key in params:
        if key not in expected:
            raise CheckpointError(
                describe(
                    source, key, "no such key", tuple(np.shape(params[key])), f"unexpected parameter for {config.name}"
                )
            )
