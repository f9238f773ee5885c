"""Which format a path is, and its tensors under the names the spec uses, behind one reader (converters.reader).

npz: keys with or without the released `params/` prefix, canonical layout. orbax: tree paths without a top-level
`params`, canonical layout. safetensors (one file, a sharded index, or a directory): transformers' in-memory names
renamed to the hub's on-disk ones, a tied `lm_head` checked and set aside, HF layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from converters import orbax_io
from converters.npz_io import NpzReader
from converters.rawio import open_regular, read_json
from converters.reader import TensorReader
from converters.safetensors_io import INDEX_NAME, SafetensorsReader
from parity import spec
from parity.errors import CheckpointError, describe

ROW_CHUNK_BYTES = 64 << 20
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


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


@dataclass
class Tensors:
    """A checkpoint's tensors: `names` maps the spec's name of each (canonical key, or HF on-disk key) to the
    reader's key. `embedded_config`: a config stored in the checkpoint's own metadata (orbax), with the file that
    holds it."""

    reader: TensorReader
    layout: str  # "canonical" or "hf" (parity.spec)
    names: dict[str, str]
    notes: list[str] = field(default_factory=list)
    embedded_config: dict | None = None
    embedded_in: str = ""
    shapes: dict[str, tuple[int, ...]] = field(init=False)  # the spec's names -> shape, from the header
    dtypes: dict[str, np.dtype] = field(init=False)

    def __post_init__(self):
        self.shapes = {n: tuple(self.reader.shape(k)) for n, k in self.names.items()}
        self.dtypes = {n: self.reader.dtype(k) for n, k in self.names.items()}

    def read(self, name: str, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.reader.read(self.names[name], index, rows)


def open_tensors(path: str, fmt: str) -> Tensors:
    """The tensors of `path` in format `fmt` (detect_format); the reader is closed again if naming them fails."""
    opener, naming = _FORMATS[fmt]
    reader = opener(path)
    try:
        return naming(path, reader)
    except BaseException:
        reader.close()
        raise


def _npz(path: str, r: NpzReader) -> Tensors:
    keys = r.keys()
    prefixed = [k.startswith(spec.NPZ_PREFIX) for k in keys]
    if any(prefixed) and not all(prefixed):
        odd = next(k for k, p in zip(keys, prefixed) if not p)
        raise CheckpointError(describe(path, odd, "every key under params/ (or none)", "a mix"))
    prefix = spec.NPZ_PREFIX if all(prefixed) else ""
    notes = [] if prefix else ["keys lack the released `params/` prefix (a notebook-saved file); read as is"]
    return Tensors(r, "canonical", {k[len(prefix) :]: k for k in keys}, notes)


def _orbax(path: str, r: orbax_io.OrbaxReader) -> Tensors:
    notes = ["tree has a top-level `params` key; read under it"] if r.prefix else []
    return Tensors(
        r,
        "canonical",
        {k: k for k in r.keys()},
        notes,
        embedded_config=r.config_dict(),
        embedded_in=orbax_io.CHECKPOINT_METADATA,
    )


def _safetensors(path: str, r: SafetensorsReader) -> Tensors:
    keymap: dict[str, str] = {}
    lm_head = None
    notes: list[str] = []
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
    if lm_head is not None:
        _check_tied(path, r, lm_head, keymap.get(f"{spec.LM}.embed_tokens.weight"))
        notes.append(f"{lm_head} is a tied copy of embed_tokens; not read")
    return Tensors(r, "hf", keymap, notes)


def _check_tied(path: str, r: TensorReader, lm_head: str, emb: str | None) -> None:
    """PaliGemma ties lm_head to the embedding: a file may carry a copy, never other values."""
    if emb is None or r.shape(lm_head) != r.shape(emb):
        raise CheckpointError(
            describe(
                path,
                lm_head,
                r.shape(emb) if emb is not None else None,
                r.shape(lm_head),
                "lm_head must be tied to embed_tokens",
            )
        )
    shape = r.shape(emb)
    n = shape[0] if shape else 1
    step = max(1, ROW_CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * r.dtype(emb).itemsize))
    for a in range(0, n, step):
        rows = (a, min(n, a + step)) if shape else None
        if not np.array_equal(r.read(lm_head, rows=rows), r.read(emb, rows=rows)):
            raise CheckpointError(
                describe(
                    path,
                    lm_head,
                    "a copy of embed_tokens (tied)",
                    "other values",
                    "PaliGemma ties lm_head to the embedding",
                )
            )


_FORMATS = {  # format -> (reader opener, the spec's names for its keys)
    "npz": (NpzReader, _npz),
    "orbax": (orbax_io.OrbaxReader, _orbax),
    "safetensors": (SafetensorsReader.open, _safetensors),
}
