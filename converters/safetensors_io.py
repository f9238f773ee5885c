"""Hugging Face safetensors: a tiny explicit reader and writer (numpy + ml_dtypes, no framework).

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]},
"__metadata__": {...}}, then the data buffer. The reader validates the header completely before any tensor is read
(a lying header is an error, never an out-of-bounds read); the writer computes the header first, then streams
tensors in header order. Sharded checkpoints: `model.safetensors.index.json` {"metadata", "weight_map"}.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import numpy as np

from converters import dtypes
from converters.rawio import pread_into, write_chunks
from parity.errors import CheckpointError, describe

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully validate one safetensors file's header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(describe(path, what="too short to be a safetensors file"))
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(describe(path, "<header>", f"a header length <= {size - 8}", n,
                                               "lying header length (truncated or not safetensors)"))
            header = f.read(n)
    except OSError as e:
        raise CheckpointError(describe(path, what=f"cannot read ({e.strerror})")) from None
    try:
        meta = json.loads(header.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(describe(path, "<header>", what=f"unreadable safetensors header ({e})")) from None
    metadata = meta.pop("__metadata__", {}) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    spans = []
    for key, t in meta.items():
        try:
            dt = dtypes.ST_DTYPES.get(t["dtype"])
            shape = tuple(int(s) for s in t["shape"])
            b, e = (int(x) for x in t["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(describe(path, key, what=f"malformed header entry ({err})")) from None
        if dt is None:
            raise CheckpointError(describe(path, key, "F32, F16 or BF16", t["dtype"], "unsupported dtype"))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if e - b != nbytes or b < 0:
            raise CheckpointError(describe(path, key, f"{nbytes} bytes for {t['dtype']}{list(shape)}",
                                           f"data_offsets [{b}, {e}]", "lying header"))
        if base + e > size:
            raise CheckpointError(describe(path, key, f"data within the file's {size - base} data bytes",
                                           f"data_offsets [{b}, {e}]", "lying header or truncated file"))
        spans.append((b, e, key))
        out[key] = TensorInfo(path, dt, shape, base + b, base + e)
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(describe(path, k1, f"data after {k0}'s end {e0}", f"begin {b1}",
                                           "lying header: overlapping tensors"))
    return out, metadata


class SafetensorsReader:
    """One file, or a sharded checkpoint through its index. Reads tensors (or leading-index slices) lazily."""

    def __init__(self, paths: list[str], index_path: str | None = None):
        self.paths = paths
        self.index_path = index_path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for p in paths:
            t, m = read_header(p)
            for k in t:
                if k in self.tensors:
                    raise CheckpointError(describe(p, k, what=f"tensor also in {self.tensors[k].file}"))
            self.tensors.update(t)
            self.metadata.update(m)
        self._fds: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SafetensorsReader":
        """A .safetensors file, an index .json, or a directory holding either."""
        path = os.fspath(path)
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, INDEX_NAME)):
                path = os.path.join(path, INDEX_NAME)
            elif os.path.exists(os.path.join(path, SINGLE_NAME)):
                path = os.path.join(path, SINGLE_NAME)
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if len(found) != 1:
                    raise CheckpointError(describe(path, what=f"no {INDEX_NAME} or {SINGLE_NAME} "
                                                              f"(found {found or 'no .safetensors files'})"))
                path = os.path.join(path, found[0])
        if path.endswith(".json"):
            return cls._from_index(path)
        return cls([path])

    @classmethod
    def _from_index(cls, index_path: str) -> "SafetensorsReader":
        try:
            with open(index_path) as f:
                wm = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(describe(index_path, "weight_map", what=f"unreadable index ({e})")) from None
        d = os.path.dirname(index_path)
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(d, f))]
        if missing:
            raise CheckpointError(describe(index_path, what=f"shards listed in weight_map are missing: {missing}"))
        r = cls([os.path.join(d, f) for f in files], index_path)
        for k, f in wm.items():
            if k not in r.tensors:
                raise CheckpointError(describe(index_path, k, f"in shard {f}", "absent", "index lists a missing tensor"))
            if os.path.basename(r.tensors[k].file) != f:
                raise CheckpointError(describe(index_path, k, f"in shard {f}",
                                               f"in {os.path.basename(r.tensors[k].file)}"))
        return r

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or rows [a, b) of its first axis."""
        t = self.tensors[key]
        shape, start = t.shape, t.begin
        if rows is not None:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * t.dtype.itemsize
            start += rows[0] * row_bytes
            shape = (rows[1] - rows[0],) + shape[1:]
        buf = np.empty(int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize, np.uint8)
        pread_into(self._fd(t.file), buf, start, t.file, key)
        return buf.view(t.dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def header_bytes(specs: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
                 ) -> bytes:
    """The header for tensors laid out in the given order, padded to 8 bytes as the reference writer does."""
    meta: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for key, dt, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        meta[key] = {"dtype": dtypes.ST_NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(meta, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h


def write_file(f: BinaryIO, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
               tensors: Iterable[Iterable[np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file: header from `specs`, then each tensor, given as consecutive C-order chunks
    (e.g. row blocks), in the same order."""
    f.write(header_bytes(specs, metadata))
    total = 0
    it = iter(tensors)
    for key, dt, shape in specs:
        total += write_chunks(f, key, dt, shape, next(it))
    return total


def plan_shards(specs: list[tuple[str, np.dtype, tuple[int, ...]]], max_shard_bytes: int | None
                ) -> list[list[int]]:
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
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "B": 1}
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
