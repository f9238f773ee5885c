"""Hugging Face safetensors: a tiny explicit reader and writer (numpy + ml_dtypes, no framework).

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]},
"__metadata__": {...}}, then the data buffer. The reader validates the header completely before any tensor is read
(a lying header is an error, never an out-of-bounds read); the writer computes the header first, then streams
tensors in header order. Sharded checkpoints: `model.safetensors.index.json` {"metadata", "weight_map"}.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from converters import dtypes
from converters.rawio import (
    JSONProblem,
    json_type,
    loads_strict,
    open_regular,
    pread_exact,
    pread_into,
    read_json,
    write_chunks,
)
from converters.reader import TensorReader
from parity.errors import CheckpointError, describe

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100_000_000  # the safetensors library's limit
_MAX_DIM = 2**64 - 1  # shapes and offsets are u64 in the reference reader


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


def _u64(x) -> bool:
    return type(x) is int and 0 <= x <= _MAX_DIM


def read_header(
    path: str, fd: int | None = None, allowed: dict[str, np.dtype] | None = None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully validate one safetensors file's header, as strictly as the safetensors library: integer
    shapes and offsets, a string-to-string `__metadata__`, a size matching each dtype and shape, and data offsets
    that tile the data section exactly (no holes, no overlaps, no trailing bytes). `allowed`: the dtypes accepted
    (default: the float dtypes of weights)."""
    allowed = dtypes.ST_DTYPES if allowed is None else allowed
    own = fd is None
    if own:
        fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise CheckpointError(describe(path, what="too short to be a safetensors file"))
        (n,) = struct.unpack("<Q", pread_exact(fd, 8, 0, path))
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                describe(
                    path,
                    "<header>",
                    f"a header length <= {min(_MAX_HEADER, size - 8)}",
                    n,
                    "lying header length (truncated or not safetensors)",
                )
            )
        header = pread_exact(fd, n, 8, path, "<header>")
    finally:
        if own:
            os.close(fd)
    try:
        meta = loads_strict(header)
    except JSONProblem as e:
        raise CheckpointError(describe(path, "<header>", what=f"unreadable safetensors header: {e}")) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            describe(path, "<header>", "a JSON object", json_type(meta), "unreadable safetensors header")
        )
    metadata = meta.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            describe(
                path,
                "__metadata__",
                "an object of strings",
                json_type(metadata) if not isinstance(metadata, dict) else "an object with non-string values",
                "malformed safetensors header",
            )
        )
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    spans = []
    for key, t in meta.items():
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= set(t):
            raise CheckpointError(
                describe(
                    path,
                    key,
                    "an object with dtype, shape and data_offsets",
                    json_type(t) if not isinstance(t, dict) else f"keys {sorted(t)}",
                    "malformed header entry",
                )
            )
        shape, offs, name = t["shape"], t["data_offsets"], t["dtype"]
        if not isinstance(shape, list) or not all(_u64(s) for s in shape):
            raise CheckpointError(
                describe(path, key, "a shape of non-negative integers", repr(shape)[:80], "malformed header entry")
            )
        if not isinstance(offs, list) or len(offs) != 2 or not all(_u64(x) for x in offs) or offs[1] < offs[0]:
            raise CheckpointError(
                describe(
                    path,
                    key,
                    "data_offsets [begin, end] of integers, begin <= end",
                    repr(offs)[:80],
                    "malformed header entry",
                )
            )
        if not isinstance(name, str) or name not in dtypes.ST_ALL_DTYPES:
            raise CheckpointError(
                describe(
                    path,
                    key,
                    f"a safetensors dtype ({', '.join(dtypes.ST_ALL_DTYPES)})",
                    repr(name)[:40],
                    "malformed header entry",
                )
            )
        if name not in allowed:
            raise CheckpointError(describe(path, key, " or ".join(allowed), name, "unsupported dtype"))
        dt = allowed[name]
        b, e = offs
        nbytes = math.prod(shape) * dt.itemsize
        if e - b != nbytes:
            raise CheckpointError(
                describe(
                    path, key, f"{nbytes} bytes for {name}{list(shape)}", f"data_offsets [{b}, {e}]", "lying header"
                )
            )
        if base + e > size:
            raise CheckpointError(
                describe(
                    path,
                    key,
                    f"data within the file's {size - base} data bytes",
                    f"data_offsets [{b}, {e}]",
                    "lying header or truncated file",
                )
            )
        spans.append((b, e, key))
        out[key] = TensorInfo(path, dt, tuple(shape), base + b, base + e)
    spans.sort()
    end, prev = 0, None
    for b, e, k in spans:
        if b != end:
            what = "overlapping tensors" if b < end else "bytes no tensor claims"
            raise CheckpointError(
                describe(
                    path,
                    k,
                    f"data_offsets beginning at {end}" + (f" (where {prev} ends)" if prev else ""),
                    f"begin {b}",
                    f"lying header: {what}",
                )
            )
        end, prev = e, k
    if base + end != size:
        raise CheckpointError(
            describe(
                path,
                "<data>",
                f"{end} data bytes (the end of the last tensor)",
                f"{size - base}",
                "lying header or trailing bytes no tensor claims",
            )
        )
    return out, metadata


class SafetensorsReader(TensorReader):
    """One file, or a sharded checkpoint through its index. Reads tensors (or leading-index slices) lazily.

    Each file is opened once (regular files only) and its header is read from that same descriptor, so what is
    read later is what was validated."""

    def __init__(self, paths: list[str], index_path: str | None = None, allowed: dict[str, np.dtype] | None = None):
        self.paths = paths
        self.index_path = index_path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._fds: dict[str, int] = {}
        try:
            for p in paths:
                self._fds[p] = fd = open_regular(p)
                t, m = read_header(p, fd, allowed)
                for k in t:
                    if k in self.tensors:
                        raise CheckpointError(describe(p, k, what=f"tensor also in {self.tensors[k].file}"))
                self.tensors.update(t)
                self.metadata.update(m)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, allowed: dict[str, np.dtype] | None = None) -> SafetensorsReader:
        """A .safetensors file, an index .json, or a directory holding either."""
        path = os.fspath(path)
        if os.path.isdir(path):
            if os.path.lexists(os.path.join(path, INDEX_NAME)):
                path = os.path.join(path, INDEX_NAME)
            elif os.path.lexists(os.path.join(path, SINGLE_NAME)):
                path = os.path.join(path, SINGLE_NAME)
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if len(found) != 1:
                    raise CheckpointError(
                        describe(
                            path, what=f"no {INDEX_NAME} or {SINGLE_NAME} (found {found or 'no .safetensors files'})"
                        )
                    )
                path = os.path.join(path, found[0])
        if path.endswith(".json"):
            return cls._from_index(path, allowed)
        return cls([path], allowed=allowed)

    @classmethod
    def _from_index(cls, index_path: str, allowed: dict[str, np.dtype] | None = None) -> SafetensorsReader:
        d = read_json(index_path, CheckpointError, "safetensors index")
        wm = d.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(
                describe(
                    index_path,
                    "weight_map",
                    "an object {tensor name: shard file}",
                    json_type(wm) if wm != {} else "an empty object",
                    "malformed index",
                )
            )
        for k, f in wm.items():
            if not isinstance(f, str) or not f or os.path.basename(f) != f or f in (".", ".."):
                raise CheckpointError(
                    describe(
                        index_path, k, "a shard file name in the index's directory", repr(f)[:80], "malformed index"
                    )
                )
        if "metadata" in d and not isinstance(d["metadata"], (dict, type(None))):
            raise CheckpointError(
                describe(index_path, "metadata", "an object", json_type(d["metadata"]), "malformed index")
            )
        base = os.path.dirname(index_path)
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.lexists(os.path.join(base, f))]
        if missing:
            raise CheckpointError(describe(index_path, what=f"shards listed in weight_map are missing: {missing}"))
        r = cls([os.path.join(base, f) for f in files], index_path, allowed)
        try:
            for k, f in wm.items():
                if k not in r.tensors:
                    raise CheckpointError(
                        describe(index_path, k, f"in shard {f}", "absent", "index lists a missing tensor")
                    )
                if os.path.basename(r.tensors[k].file) != f:
                    raise CheckpointError(
                        describe(index_path, k, f"in shard {f}", f"in {os.path.basename(r.tensors[k].file)}")
                    )
            extra = [k for k in r.tensors if k not in wm]
            if extra:
                raise CheckpointError(
                    describe(
                        index_path,
                        extra[0],
                        f"listed in weight_map (it is in {os.path.basename(r.tensors[extra[0]].file)})",
                        "absent",
                        "a shard holds a tensor the index does not list",
                    )
                )
        except BaseException:
            r.close()
            raise
        return r

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.tensors[key].dtype

    def read(self, key: str, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, `tensor[index]` for leading integer indices, or rows [a, b) of the first axis after them."""
        t = self.tensors[key]
        shape, start = t.shape[len(index) :], t.begin
        flat = 0
        for i, n in zip(index, t.shape):
            if not 0 <= i < n:
                raise IndexError(f"{key}: index {index} out of range for shape {t.shape}")
            flat = flat * n + i
        start += flat * math.prod(shape) * t.dtype.itemsize
        if rows is not None:
            if not (shape and 0 <= rows[0] <= rows[1] <= shape[0]):
                raise IndexError(f"{key}: rows {rows} out of range for shape {t.shape} at index {index}")
            start += rows[0] * math.prod(shape[1:]) * t.dtype.itemsize
            shape = (rows[1] - rows[0],) + shape[1:]
        buf = np.empty(math.prod(shape) * t.dtype.itemsize, np.uint8)
        pread_into(self._fds[t.file], buf, start, t.file, key)
        return buf.view(t.dtype).reshape(shape)

    def verify_all(self) -> None:
        """safetensors stores no checksums (its header's offsets were checked on opening): nothing to finish."""

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_WRITE_NAMES = {v: k for k, v in dtypes.ST_ALL_DTYPES.items()}  # checkpoints hold floats; captures also ints


def header_bytes(specs: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The header for tensors laid out in the given order, padded to 8 bytes as the reference writer does."""
    meta: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for key, dt, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        meta[key] = {"dtype": _WRITE_NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(meta, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h


def write_file(
    f: BinaryIO,
    specs: list[tuple[str, np.dtype, tuple[int, ...]]],
    tensors: Iterable[Iterable[np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file: header from `specs`, then each tensor, given as consecutive C-order chunks
    (e.g. row blocks), in the same order."""
    f.write(header_bytes(specs, metadata))
    total = 0
    it = iter(tensors)
    for key, dt, shape in specs:
        total += write_chunks(f, key, dt, shape, next(it))
    return total


def plan_shards(specs: list[tuple[str, np.dtype, tuple[int, ...]]], max_shard_bytes: int | None) -> list[list[int]]:
    """Group tensor indices into shards of at most max_shard_bytes (a tensor larger than that gets its own)."""
    if not max_shard_bytes:
        return [list(range(len(specs)))]
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dt, shape) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def parse_size(text: str | int | None) -> int | None:
    """'2GB', '500MB', '5GiB', or a byte count."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().upper()
    units = {
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    for u, m in units.items():
        if t.endswith(u):
            num = t[: -len(u)].strip()
            try:
                return int(float(num) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (e.g. 2GB, 500MB, 5GiB)") from None
