"""A checkpoint opened in canonical terms, whatever its format: the one place formats meet the spec.

`open_checkpoint(path)` detects the format (converters.formats: npz; safetensors: one file, a sharded index, or a
directory; an orbax checkpoint directory), resolves the config (converters.config_source: explicit,
sidecar/config.json/orbax custom metadata, or detected from the shapes), and checks every tensor against the spec
before anything is converted or loaded. A checkpoint reads its file through the reader protocol
(converters.reader) only; what differs is the spec layout the file stores (canonical, or HF).
`Checkpoint.canonical_chunks(entry)` and `hf_chunks(...)` stream a tensor in either layout as blocks of bounded size
(converters.blocks), derived from the spec's rows; no format pair has code of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from converters import blocks, dtypes, hub
from converters.config_source import (
    LAYOUTS,
    config_beside,
    departures,
    detect_config,
    expected_shapes,
    infer_config,
    resolve_config,
    sidecar_path,
)
from converters.formats import Tensors, detect_format, normalize_hf_key, open_tensors
from parity import spec
from parity.config import ALL_VARIANTS, PaliGemmaConfig
from parity.errors import CheckpointError, ConfigError, describe
from parity.param_blocks import ParamBlocks

__all__ = [  # what other modules import from here
    "Checkpoint",
    "departures",
    "detect_format",
    "expected_shapes",
    "load_checkpoint",
    "normalize_hf_key",
    "open_checkpoint",
    "resolve_config",
    "sidecar_path",
]


@dataclass
class Checkpoint:
    path: str
    format: str
    config: PaliGemmaConfig | None
    config_source: str  # how the config was found
    tensors: Tensors

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The spec's names (npz: without prefix; safetensors: hub on-disk names) -> shape in the file."""
        return self.tensors.shapes

    @property
    def native_dtypes(self) -> dict[str, np.dtype]:
        return self.tensors.dtypes

    @property
    def notes(self) -> list[str]:
        return self.tensors.notes

    @property
    def _hf(self) -> bool:
        """The file stores the HF layout (per-layer tensors, split pieces, padded vocabulary)."""
        return self.tensors.layout == "hf"

    # -- reading in canonical terms --------------------------------------------------------------------------
    def entries(self) -> list[spec.Entry]:
        return spec.entries(self.config)

    def dtype(self, e: spec.Entry) -> np.dtype:
        return self.native_dtypes[next(k for k, _ in e.hf_keys()) if self._hf else e.key]

    def canonical(self, e: spec.Entry, index: tuple[int, ...] = ()) -> np.ndarray:
        """The canonical tensor, or `tensor[index]` for a layer (i,) or a layer piece (i, j)."""
        if not self._hf:
            return self.tensors.read(e.key, index)
        addrs = {a: k for k, a in e.hf_keys()}
        multi = len(e.hf_templates) > 1

        def piece(i, j):
            return e.from_hf(self.tensors.read(addrs[(i, j)]))

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

    def _is_rows(self, e: spec.Entry) -> bool:
        """A large non-layered tensor whose only op is PAD (the embedding): streamed in row blocks."""
        return e.layers is None and all(op.kind == "PAD" for op in e.ops)

    @staticmethod
    def _is_transpose(e: spec.Entry) -> bool:
        """A 2-D piece whose only op is a transpose (the MLP kernels): transposed block by block."""
        return len(e.piece_shape) == 2 and [(op.kind, op.args) for op in e.ops] == [("T", (1, 0))]

    def canonical_block(self, e: spec.Entry, index: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
        """`tensor[index][rows[0]:rows[1]]` of the canonical tensor (a block of `blocks.blocks`)."""
        if not self._hf:
            return self.tensors.read(e.key, index, rows)
        a, b = rows
        multi = len(e.hf_templates) > 1
        if e.layers is None:
            if self._is_rows(e):
                return self.tensors.read(next(k for k, _ in e.hf_keys()), rows=rows)
            return self.canonical(e)[index][a:b]
        depth = 2 if multi else 1  # leading indices that name one HF tensor (one piece)
        if len(index) == depth - 1 and b - a == 1:  # one piece: one HF tensor, no stacking copy
            return self._hf_piece(e, index + (a,), (0, e.piece_shape[0]))[None]
        if not index:  # whole layers
            return np.stack([self.canonical(e, (i,)) for i in range(a, b)])
        if len(index) < depth:  # whole pieces of layer i
            return np.stack([self.canonical(e, (index[0], j)) for j in range(a, b)])
        if len(index) == depth:
            return self._hf_piece(e, index, rows)
        return self.canonical(e, index[:depth])[index[depth:]][a:b]  # the piece whole (bounded by the piece)

    def _hf_piece(self, e: spec.Entry, index: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
        """Rows of one canonical piece from its HF tensor; a transposed one from row bands of it."""
        if not self._is_transpose(e):
            return self.canonical(e, index)[rows[0] : rows[1]]
        multi = len(e.hf_templates) > 1
        hf_key = {ad: k for k, ad in e.hf_keys()}[(index[0], index[1] if multi else None)]
        C, R = e.hf_shape  # rows [a, b) of the piece = columns [a, b) of the HF tensor, transposed
        return blocks.transposed_columns(
            lambda r0, r1: self.tensors.read(hf_key, rows=(r0, r1)), C, R, cols=rows, dtype=self.dtype(e)
        )

    def canonical_chunks(self, e: spec.Entry) -> Iterator[np.ndarray]:
        """Consecutive C-order blocks of the canonical tensor (converters.blocks)."""
        for index, rows in blocks.blocks(e.shape, self.dtype(e).itemsize):
            yield self.canonical_block(e, index, rows)

    def pad_rows(self, e: spec.Entry) -> np.ndarray | None:
        """HF vocabulary padding rows: the file's own when it has them (HF layout), else the mean row."""
        if not e.lossy:
            return None
        hf_key = next(k for k, _ in e.hf_keys())
        if self._hf:
            return self.tensors.read(hf_key, rows=(e.shape[0], e.hf_shape[0]))
        mean = spec.MeanRow()
        for c in self.canonical_chunks(e):
            mean.add(c)
        return mean.value(self.dtype(e))

    def hf_chunks(self, e: spec.Entry, addr, dtype: np.dtype | None) -> Iterator[np.ndarray]:
        """Consecutive C-order blocks of one HF tensor."""
        if self._is_rows(e):
            mean = spec.MeanRow() if e.lossy and not self._hf else None
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
        if self._hf or not self._is_transpose(e) or blocks.plan(e.hf_shape, src.itemsize)[0] != 0:
            yield dtypes.cast(e.to_hf(self.canonical(e, index), self.pad_rows(e)), dtype)
            return
        R, C = e.piece_shape  # HF (C, R): its rows [a, b) are columns [a, b) of the piece, transposed
        for _, cols in blocks.blocks(e.hf_shape, src.itemsize):
            yield dtypes.cast(
                blocks.transposed_columns(
                    lambda r0, r1: self.canonical_block(e, index, (r0, r1)), R, C, cols=cols, dtype=src
                ),
                dtype,
            )

    def blocks(
        self, dtype: np.dtype | None = None, progress: Callable[[int, int, str], None] | None = None
    ) -> Iterator[tuple[str, tuple[int, ...], tuple[int, int], np.ndarray]]:
        """Every canonical tensor as consecutive C-order blocks `(key, index, rows, tensor[index][rows[0]:rows[1]])`
        (converters.blocks: at most BLOCK_BYTES each on disk), cast to `dtype` (None: as stored); progress(bytes
        read, total, key) after each. The stored checksums are verified after the last block (verify_read), so a
        consumer must not keep what it built from the blocks when iterating raises."""
        total = sum(int(np.prod(e.shape)) * self.dtype(e).itemsize for e in self.entries()) if progress else 0
        done = 0
        for e in self.entries():
            for index, rows in blocks.blocks(e.shape, self.dtype(e).itemsize):
                c = self.canonical_block(e, index, rows)
                done += c.nbytes
                yield e.key, index, rows, dtypes.cast(c, dtype)
                del c
                if progress:
                    progress(done, total, e.key)
        self.verify_read()

    def load(
        self,
        dtype: np.dtype | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        *,
        stream: bool = False,
    ) -> dict[str, np.ndarray] | ParamBlocks:
        """Every canonical tensor, cast to `dtype` (None: as stored); progress(bytes read, total, key) per block.
        stream=True: as parity.param_blocks.ParamBlocks, read lazily block by block while an implementation's
        loader copies them into its tensors (no second copy of the model); else a numpy dict (what backends
        without block loading are given, and the converters' tools), each tensor filled block by block in place."""
        shapes = {e.key: tuple(e.shape) for e in self.entries()}
        if stream:
            return ParamBlocks(shapes, self.blocks(dtype, progress), self.path)
        out: dict[str, np.ndarray] = {}
        for key, index, rows, c in self.blocks(dtype, progress):
            if key not in out:
                out[key] = np.empty(shapes[key], c.dtype)
            out[key][index][rows[0] : rows[1]] = c
        return out

    def verify_read(self) -> None:
        """Finish the checksum check of every tensor (npz CRC-32, ours in orbax): front-to-back reads verify on
        the way; whatever was read out of order (or not at all) is read again here, so no corrupt member passes
        unnoticed."""
        self.tensors.reader.verify_all()

    def close(self) -> None:
        self.tensors.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(
    path: str | os.PathLike, config: PaliGemmaConfig | str | None = None, strict: bool = True
) -> Checkpoint:
    """Open `path` (or a hub reference, see converters.hub), resolve its config and check every tensor against the
    spec (CheckpointError/ConfigError)."""
    path = hub.resolve(path)
    fmt = detect_format(path)
    tensors = open_tensors(path, fmt)
    try:
        cfg, source = _find_config(path, fmt, tensors, config, strict)
        if strict:
            problems = departures(tensors.shapes, cfg, fmt)
            if problems:
                key, exp, found, what = problems[0]
                more = f" (+{len(problems) - 1} more departures; run `parity inspect`)" if len(problems) > 1 else ""
                cls = ConfigError if what == "wrong shape" and source != "detected from shapes" else CheckpointError
                raise cls(describe(path, key, exp, found, f"{what} for config {cfg.name} ({source}){more}"))
    except BaseException:
        tensors.reader.close()
        raise
    return Checkpoint(path=path, format=fmt, config=cfg, config_source=source, tensors=tensors)


def _find_config(
    path: str, fmt: str, tensors: Tensors, config: PaliGemmaConfig | str | None, strict: bool
) -> tuple[PaliGemmaConfig | None, str]:
    """(config, how it was found): given, travelling with the file, detected, or (not strict) inferred."""
    cfg = resolve_config(config)
    if cfg is not None:
        return cfg, "--config"
    cfg, source = config_beside(path, fmt, tensors.embedded_config, tensors.embedded_in)
    if cfg is not None:
        return cfg, source
    cfg = detect_config(tensors.shapes, fmt)
    if cfg is not None:
        return cfg, "detected from shapes"
    guess = infer_config(tensors.shapes) if LAYOUTS[fmt] == "canonical" else None
    if not strict and guess is not None:
        return guess, "inferred from shapes (non-shape fields are Gemma defaults)"
    if not strict:
        return None, "unknown"
    what = (
        "shapes match no known variant; give --config NAME or the path of a config.json "
        f"(variants: {', '.join(ALL_VARIANTS)})"
    )
    raise ConfigError(describe(path, what=what))


def load_checkpoint(
    path: str | os.PathLike, config: PaliGemmaConfig | str | None = None, dtype: str | None = None
) -> tuple[PaliGemmaConfig, dict[str, np.ndarray]]:
    """(config, canonical params) of any supported checkpoint; what both implementations load through."""
    with open_checkpoint(path, config) as ck:
        return ck.config, ck.load(dtypes.FLOAT_DTYPES[dtype] if dtype else None)
