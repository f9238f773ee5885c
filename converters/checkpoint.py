"""A checkpoint opened in canonical terms, whatever its format: the one place formats meet the spec.

`open_checkpoint(path)` detects the format (npz; safetensors: one file, a sharded index, or a directory; an orbax
checkpoint directory), resolves the config (explicit, sidecar/config.json/orbax custom metadata, or detected from
the shapes), and checks every tensor against the spec before anything is converted or loaded.
`Checkpoint.canonical_chunks(entry)` and `hf_chunks(...)` stream a tensor in either layout as blocks of bounded size
(converters.blocks), derived from the spec's rows; no format pair has code of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from converters import blocks, dtypes, hub, orbax_io
from converters.hf_config import config_from_dict, from_hf_config
from converters.npz_io import NpzReader
from converters.rawio import open_regular, read_json
from converters.safetensors_io import INDEX_NAME, SafetensorsReader
from parity import spec
from parity.config import ALL_VARIANTS, PaliGemmaConfig, QueryScale, TextConfig, VisionConfig, get_config
from parity.errors import CheckpointError, ConfigError, describe

ROW_CHUNK_BYTES = 64 << 20
SIDECAR_SUFFIX = ".parity.json"


def sidecar_path(npz_path: str) -> str:
    """The JSON beside an npz that carries what shapes cannot tell (softcaps, query scale, window)."""
    return os.fspath(npz_path) + SIDECAR_SUFFIX


def detect_format(path: str) -> str:
    """'npz', 'safetensors' or 'orbax'; CheckpointError for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(describe(path, what="no such file or directory"))
    if os.path.isdir(path):
        names = os.listdir(path)
        if (
            orbax_io.is_orbax_dir(path)
            or orbax_io.OCDBT_MANIFEST in names
            or "ocdbt.process_0" in names
            or orbax_io.TMP_MARKER in os.path.basename(os.path.abspath(path))
        ):
            return "orbax"
        if INDEX_NAME in names or any(n.endswith(".safetensors") for n in names):
            return "safetensors"
        if any(n.endswith(".npz") for n in names):
            raise CheckpointError(describe(path, what="a directory; name the .npz file inside it"))
        raise CheckpointError(describe(path, what="directory holds no .safetensors or index file"))
    fd = open_regular(path)
    try:
        head = os.pread(fd, 9, 0)
    finally:
        os.close(fd)
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "npz"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if path.endswith(".json") and "weight_map" in read_json(path, CheckpointError, "safetensors index"):
        return "safetensors"
    raise CheckpointError(
        describe(path, what="not a checkpoint: neither an npz (zip) archive nor a safetensors file, index or directory")
    )


def normalize_hf_key(key: str) -> str:
    """transformers' in-memory names (4.52+, 5.6+) to the hub's on-disk names used by the spec."""
    for old, new in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(old):
            key = new + key[len(old) :]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


def resolve_config(config: PaliGemmaConfig | str | None) -> PaliGemmaConfig | None:
    """A config object, a variant name, the path of a HF config.json, or of a paligemma-parity sidecar."""
    if config is None or isinstance(config, PaliGemmaConfig):
        return config
    if os.path.lexists(config):
        d = read_json(config, ConfigError, "config JSON")
        try:
            if d.get("model_type") == "paligemma" or "parity_config" in d:
                return from_hf_config(d, name=os.path.basename(os.path.dirname(os.path.abspath(config))))
            return config_from_dict(d)
        except ValueError as e:
            raise ConfigError(describe(config, what=str(e))) from None
    try:
        return get_config(config)
    except KeyError as e:
        raise ConfigError(str(e.args[0]) + " (or give the path of a config.json)") from None


@dataclass
class Checkpoint:
    path: str
    format: str
    config: PaliGemmaConfig
    config_source: str  # how the config was found
    shapes: dict[str, tuple[int, ...]]  # native keys (npz: without prefix; st: normalized) -> shape
    native_dtypes: dict[str, np.dtype]
    notes: list[str] = field(default_factory=list)
    _npz: NpzReader | None = None
    _st: SafetensorsReader | None = None
    _orbax: orbax_io.OrbaxReader | None = None
    _npz_prefix: str = ""
    _st_keys: dict[str, str] = field(default_factory=dict)  # normalized -> key in file

    # -- reading in canonical terms --------------------------------------------------------------------------
    def entries(self) -> list[spec.Entry]:
        return spec.entries(self.config)

    def dtype(self, e: spec.Entry) -> np.dtype:
        if self.format in ("npz", "orbax"):
            return self.native_dtypes[e.key]
        return self.native_dtypes[next(k for k, _ in e.hf_keys())]

    def canonical(self, e: spec.Entry, index: tuple[int, ...] = ()) -> np.ndarray:
        """The canonical tensor, or `tensor[index]` for a layer (i,) or a layer piece (i, j)."""
        if self._npz is not None:
            return self._npz.read(self._npz_prefix + e.key, index)
        if self._orbax is not None:
            return self._orbax.read(e.key, index)
        addrs = {a: k for k, a in e.hf_keys()}
        multi = len(e.hf_templates) > 1

        def piece(i, j):
            return e.from_hf(self._read_st(addrs[(i, j)]))

        def layer(i):
            return np.stack([piece(i, j) for j in range(len(e.hf_templates))]) if multi else piece(i, None)

        if e.layers is None:
            if index:
                return layer(None)[index]
            return layer(None)
        if len(index) == 2:
            return piece(index[0], index[1])
        if len(index) == 1:
            return layer(index[0])
        return np.stack([layer(i) for i in range(e.layers)])

    def _read_st(self, key: str, rows=None) -> np.ndarray:
        return self._st.read(self._st_keys[key], rows)

    def _is_rows(self, e: spec.Entry) -> bool:
        """A large non-layered tensor whose only op is PAD (the embedding): streamed in row blocks."""
        return e.layers is None and all(op.kind == "PAD" for op in e.ops)

    @staticmethod
    def _is_transpose(e: spec.Entry) -> bool:
        """A 2-D piece whose only op is a transpose (the MLP kernels): transposed block by block."""
        return len(e.piece_shape) == 2 and [(op.kind, op.args) for op in e.ops] == [("T", (1, 0))]

    def canonical_block(self, e: spec.Entry, index: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
        """`tensor[index][rows[0]:rows[1]]` of the canonical tensor (a block of `blocks.blocks`)."""
        if self._npz is not None:
            return self._npz.read(self._npz_prefix + e.key, index, rows)
        if self._orbax is not None:
            return self._orbax.read(e.key, index, rows)
        a, b = rows
        multi = len(e.hf_templates) > 1
        if e.layers is None:
            if self._is_rows(e):
                return self._read_st(next(k for k, _ in e.hf_keys()), rows)
            return self.canonical(e)[index][a:b]
        depth = 2 if multi else 1  # leading indices that name one HF tensor (one piece)
        if len(index) == depth - 1 and b - a == 1:  # one piece: one HF tensor, no stacking copy
            return self._st_piece(e, index + (a,), (0, e.piece_shape[0]))[None]
        if not index:  # whole layers
            return np.stack([self.canonical(e, (i,)) for i in range(a, b)])
        if len(index) < depth:  # whole pieces of layer i
            return np.stack([self.canonical(e, (index[0], j)) for j in range(a, b)])
        if len(index) == depth:
            return self._st_piece(e, index, rows)
        return self.canonical(e, index[:depth])[index[depth:]][a:b]  # the piece whole (bounded by the piece)

    def _st_piece(self, e: spec.Entry, index: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
        """Rows of one canonical piece from its HF tensor; a transposed one from row bands of it."""
        if not self._is_transpose(e):
            return self.canonical(e, index)[rows[0] : rows[1]]
        multi = len(e.hf_templates) > 1
        hf_key = {ad: k for k, ad in e.hf_keys()}[(index[0], index[1] if multi else None)]
        C, R = e.hf_shape  # rows [a, b) of the piece = columns [a, b) of the HF tensor, transposed
        return blocks.transposed_columns(
            lambda r0, r1: self._read_st(hf_key, (r0, r1)), C, R, rows[0], rows[1], self.dtype(e)
        )

    def canonical_chunks(self, e: spec.Entry) -> Iterator[np.ndarray]:
        """Consecutive C-order blocks of the canonical tensor (converters.blocks)."""
        for index, rows in blocks.blocks(e.shape, self.dtype(e).itemsize):
            yield self.canonical_block(e, index, rows)

    def pad_rows(self, e: spec.Entry) -> np.ndarray | None:
        """HF vocabulary padding rows: the file's own when it has them (safetensors), else the mean row."""
        if not e.lossy:
            return None
        hf_key = next(k for k, _ in e.hf_keys())
        if self._st is not None:
            return self._read_st(hf_key, (e.shape[0], e.hf_shape[0]))
        mean = spec.MeanRow()
        for c in self.canonical_chunks(e):
            mean.add(c)
        return mean.value(self.dtype(e))

    def hf_chunks(self, e: spec.Entry, addr, dtype: np.dtype | None) -> Iterator[np.ndarray]:
        """Consecutive C-order blocks of one HF tensor."""
        if self._is_rows(e):
            mean = spec.MeanRow() if e.lossy and self._st is None else None
            for c in self.canonical_chunks(e):
                if mean is not None:  # the mean row, accumulated on the way: one pass over the table
                    mean.add(c)
                yield dtypes.cast(c, dtype)
            if e.lossy:
                n = e.hf_shape[0] - e.shape[0]
                pad = self.pad_rows(e) if mean is None else mean.value(self.dtype(e))
                yield dtypes.cast(np.ascontiguousarray(np.broadcast_to(pad, (n,) + e.shape[1:])), dtype)
            return
        index, src = e.index(addr), self.dtype(e)
        if self._st is not None or not self._is_transpose(e) or blocks.plan(e.hf_shape, src.itemsize)[0] != 0:
            yield dtypes.cast(e.to_hf(self.canonical(e, index), self.pad_rows(e)), dtype)
            return
        R, C = e.piece_shape  # HF (C, R): its rows [a, b) are columns [a, b) of the piece, transposed
        for _, (a, b) in blocks.blocks(e.hf_shape, src.itemsize):
            yield dtypes.cast(
                blocks.transposed_columns(lambda r0, r1: self.canonical_block(e, index, (r0, r1)), R, C, a, b, src),
                dtype,
            )

    def load(
        self, dtype: np.dtype | None = None, progress: Callable[[int, int, str], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Every canonical tensor in memory (for building a model); progress(bytes read, total, key) per chunk."""
        out = {}
        total = sum(int(np.prod(e.shape)) * self.dtype(e).itemsize for e in self.entries()) if progress else 0
        done = 0
        for e in self.entries():
            chunks = []
            for c in self.canonical_chunks(e):
                chunks.append(dtypes.cast(c, dtype))
                done += c.nbytes
                if progress:
                    progress(done, total, e.key)
            out[e.key] = np.concatenate(chunks).reshape(e.shape) if len(chunks) > 1 else chunks[0].reshape(e.shape)
        self.verify_read()
        return out

    def verify_read(self) -> None:
        """Finish the CRC-32 check of every npz member: front-to-back reads verify on the way; whatever was read
        out of order (or not at all) is read again here, so no corrupt member passes unnoticed."""
        if self._npz is not None:
            self._npz.verify_all()

    def close(self) -> None:
        if self._npz is not None:
            self._npz.close()
        if self._st is not None:
            self._st.close()
        if self._orbax is not None:
            self._orbax.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- opening ---------------------------------------------------------------------------------------------------
def _native_npz(path: str) -> tuple[NpzReader, str, dict, dict]:
    r = NpzReader(path)
    keys = r.keys()
    prefixed = [k.startswith(spec.NPZ_PREFIX) for k in keys]
    if any(prefixed) and not all(prefixed):
        odd = next(k for k, p in zip(keys, prefixed) if not p)
        raise CheckpointError(describe(path, odd, "every key under params/ (or none)", "a mix"))
    prefix = spec.NPZ_PREFIX if all(prefixed) else ""
    shapes = {k[len(prefix) :]: m.shape for k, m in r.members.items()}
    dts = {k[len(prefix) :]: m.dtype for k, m in r.members.items()}
    return r, prefix, shapes, dts


def _native_st(path: str, notes: list[str]) -> tuple[SafetensorsReader, dict, dict, dict]:
    r = SafetensorsReader.open(path)
    keymap: dict[str, str] = {}
    lm_head = None
    for k in r.keys():
        if k in LM_HEAD_KEYS:
            lm_head = k
            continue
        n = normalize_hf_key(k)
        if n in keymap:
            raise CheckpointError(describe(path, k, what=f"duplicates {keymap[n]} after renaming"))
        keymap[n] = k
    if any(n != k for n, k in keymap.items()):
        notes.append("tensor names are transformers' in-memory names; read as the hub's on-disk names")
    shapes = {n: r.tensors[k].shape for n, k in keymap.items()}
    dts = {n: r.tensors[k].dtype for n, k in keymap.items()}
    if lm_head is not None:
        emb = "language_model.model.embed_tokens.weight"
        if emb in keymap and r.tensors[lm_head].shape == shapes[emb]:
            n = shapes[emb][0]
            step = max(1, ROW_CHUNK_BYTES // max(1, int(np.prod(shapes[emb][1:])) * dts[emb].itemsize))
            for a in range(0, n, step):
                rows = (a, min(n, a + step))
                if not np.array_equal(r.read(lm_head, rows), r.read(keymap[emb], rows)):
                    raise CheckpointError(
                        describe(
                            path,
                            lm_head,
                            "a copy of embed_tokens (tied)",
                            "other values",
                            "PaliGemma ties lm_head to the embedding",
                        )
                    )
            notes.append(f"{lm_head} is a tied copy of embed_tokens; not read")
        else:
            raise CheckpointError(
                describe(
                    path, lm_head, shapes.get(emb), r.tensors[lm_head].shape, "lm_head must be tied to embed_tokens"
                )
            )
    return r, keymap, shapes, dts


def _native_orbax(path: str, notes: list[str]) -> tuple[orbax_io.OrbaxReader, dict, dict]:
    r = orbax_io.OrbaxReader(path)
    if r.prefix:
        notes.append("tree has a top-level `params` key; read under it")
    return r, {k: a.shape for k, a in r.arrays.items()}, {k: a.dtype for k, a in r.arrays.items()}


def expected_shapes(config: PaliGemmaConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    return spec.hf_shapes(config) if fmt == "safetensors" else spec.canonical_shapes(config)


def departures(shapes: dict, config: PaliGemmaConfig, fmt: str) -> list[tuple[str, object, object, str]]:
    """(key, expected, found, what) for every way the file departs from the spec under `config`."""
    exp = expected_shapes(config, fmt)
    out = []
    for k, s in exp.items():
        if k not in shapes:
            out.append((k, s, "absent", "missing key"))
        elif tuple(shapes[k]) != tuple(s):
            out.append((k, tuple(s), tuple(shapes[k]), "wrong shape"))
    for k in shapes:
        if k not in exp:
            out.append((k, "absent", tuple(shapes[k]), "unexpected key"))
    return out


def detect_config(shapes: dict, fmt: str) -> PaliGemmaConfig | None:
    """The released (or tiny) variant whose spec shapes equal the file's exactly."""
    for cfg in ALL_VARIANTS.values():
        if not departures(shapes, cfg, fmt):
            return cfg
    return None


def infer_config(shapes: dict) -> PaliGemmaConfig | None:
    """Best guess from npz shapes alone, for `inspect` of unknown files (Gemma 2 defaults for what shapes cannot
    tell). None if the shapes are too incomplete."""
    try:
        kern = shapes["img/embedding/kernel"]
        T = shapes["img/pos_embedding"][1]
        Lv, Dv, Nv, Hv = shapes["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]
        Fv = shapes["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"][2]
        V, D = shapes["llm/embedder/input_embedding"]
        if "llm/layers/attn/qkv_einsum/w" in shapes:
            L, _, N, _, H = shapes["llm/layers/attn/qkv_einsum/w"]
            K = N
        else:
            L, N, _, H = shapes["llm/layers/attn/q_einsum/w"]
            K = shapes["llm/layers/attn/kv_einsum/w"][2]
        F = shapes["llm/layers/mlp/gating_einsum"][3]
    except (KeyError, ValueError, IndexError):
        return None
    gemma2 = "llm/layers/post_attention_norm/scale" in shapes
    g2 = dict(gemma2=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096) if gemma2 else {}
    side = int(round(T**0.5))
    try:
        text = TextConfig(
            width=D,
            depth=L,
            mlp_dim=F,
            num_heads=N,
            num_kv_heads=K,
            head_dim=H,
            vocab_size=V,
            query_scale=QueryScale.HEAD_DIM,
            **g2,
        )
        return PaliGemmaConfig("inferred", VisionConfig(Dv, Lv, Fv, Nv, kern[0], side * kern[0]), text)
    except ValueError:
        return None


def open_checkpoint(
    path: str | os.PathLike, config: PaliGemmaConfig | str | None = None, strict: bool = True
) -> Checkpoint:
    """Open `path` (or a hub reference, see converters.hub), resolve its config and check every tensor against the
    spec (CheckpointError/ConfigError)."""
    path = hub.resolve(path)
    fmt = detect_format(path)
    notes: list[str] = []
    npz = st = ob = None
    prefix, keymap = "", {}
    if fmt == "npz":
        npz, prefix, shapes, dts = _native_npz(path)
        if not prefix:
            notes.append("keys lack the released `params/` prefix (a notebook-saved file); read as is")
    elif fmt == "orbax":
        ob, shapes, dts = _native_orbax(path, notes)
    else:
        st, keymap, shapes, dts = _native_st(path, notes)
    cfg = resolve_config(config)
    source = "--config" if cfg is not None else ""
    if cfg is None:
        cfg, source = _config_beside(path, fmt, ob)
    if cfg is None:
        cfg = detect_config(shapes, fmt)
        source = "detected from shapes" if cfg is not None else ""
    if cfg is None:
        guess = infer_config(shapes) if fmt != "safetensors" else None
        if not strict and guess is not None:
            cfg, source = guess, "inferred from shapes (non-shape fields are Gemma defaults)"
        elif not strict:
            cfg, source = None, "unknown"
        else:
            what = (
                "shapes match no known variant; give --config NAME or the path of a config.json "
                f"(variants: {', '.join(ALL_VARIANTS)})"
            )
            raise ConfigError(describe(path, what=what))
    ck = Checkpoint(path, fmt, cfg, source, shapes, dts, notes, npz, st, ob, prefix, keymap)
    if strict:
        problems = departures(shapes, cfg, fmt)
        if problems:
            key, exp, found, what = problems[0]
            more = f" (+{len(problems) - 1} more departures; run `parity inspect`)" if len(problems) > 1 else ""
            cls = ConfigError if what == "wrong shape" and source != "detected from shapes" else CheckpointError
            raise cls(describe(path, key, exp, found, f"{what} for config {cfg.name} ({source}){more}"))
    return ck


def _config_beside(path: str, fmt: str, ob) -> tuple[PaliGemmaConfig | None, str]:
    if fmt == "orbax":
        d = ob.config_dict()
        if d is None:
            return None, ""
        try:
            return PaliGemmaConfig.from_dict(d), "orbax custom metadata"
        except ValueError as e:
            raise ConfigError(describe(path, orbax_io.CHECKPOINT_METADATA, what=str(e))) from None
    if fmt == "npz":
        side = sidecar_path(path)
        if os.path.exists(side):
            return resolve_config(side), f"sidecar {os.path.basename(side)}"
        return None, ""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cj = os.path.join(d, "config.json")
    if os.path.exists(cj):
        return resolve_config(cj), "config.json"
    return None, ""


def load_checkpoint(
    path: str | os.PathLike, config: PaliGemmaConfig | str | None = None, dtype: str | None = None
) -> tuple[PaliGemmaConfig, dict[str, np.ndarray]]:
    """(config, canonical params) of any supported checkpoint; what both implementations load through."""
    with open_checkpoint(path, config) as ck:
        return ck.config, ck.load(dtypes.FLOAT_DTYPES[dtype] if dtype else None)
