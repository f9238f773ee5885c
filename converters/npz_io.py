"""Kaggle / big_vision `.npz`: read members lazily by their byte ranges, write members as a stream.

np.savez stores members uncompressed (ZIP_STORED), so a member is an npy header followed by raw C-order bytes at
a known offset of the archive: a layer of a stacked tensor is a contiguous byte range we read with os.pread.
Nothing is unpickled (object arrays are refused). CRC-32 of a member is verified whenever it is read front to
back (which the converters do), so corrupt data is caught without a second pass.
"""
from __future__ import annotations

import ast
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

import numpy as np

from converters import dtypes
from converters.rawio import pread_into, write_chunks
from parity.errors import CheckpointError, describe

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


@dataclass
class Member:
    key: str  # archive name without `.npy`
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the array data
    crc: int
    _crc_pos: int = 0  # bytes of the data (incl. npy header) verified so far, front to back
    _crc_val: int = 0
    _header: bytes = field(default=b"", repr=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class NpzReader:
    """Lazy, read-only view of an npz archive. `keys()` are the member names without `.npy`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise CheckpointError(describe(self.path, what=f"not a readable npz/zip archive, truncated or "
                                                             f"corrupt ({e})")) from None
        except OSError as e:
            raise CheckpointError(describe(self.path, what=f"cannot open ({e.strerror})")) from None
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self.members: dict[str, Member] = {}
        with zf:
            infos = zf.infolist()
            if not infos:
                raise CheckpointError(describe(self.path, what="empty zip archive, not a checkpoint"))
            for info in infos:
                self._add(info)

    def _add(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if not name.endswith(".npy"):
            raise CheckpointError(describe(self.path, name, "an .npy member", "another file",
                                           "not an npz checkpoint"))
        key = name[:-4]
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(describe(self.path, key, "an uncompressed (np.savez) member",
                                           "a compressed one (np.savez_compressed)",
                                           "compressed members cannot be streamed; re-save with np.savez"))
        raw = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
        if len(raw) < _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
            raise CheckpointError(describe(self.path, key, what="corrupt zip: bad local file header"))
        name_len, extra_len = _LOCAL_HEADER.unpack(raw)[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        head = os.pread(self._fd, min(65536 + 12, info.file_size), start)
        dtype, shape, hlen = _parse_npy_header(head, self.path, key)
        m = Member(key, dtype, shape, start + hlen, info.CRC, _header=head[:hlen])
        if hlen + m.nbytes != info.file_size or start + info.file_size > self._size:
            raise CheckpointError(describe(
                self.path, key, f"{hlen + m.nbytes} bytes for {dtypes.name(dtype)}{list(shape)}",
                f"{min(info.file_size, self._size - start)} bytes", "truncated or corrupt member"))
        m._crc_val = zlib.crc32(m._header)
        m._crc_pos = 0
        self.members[key] = m

    def keys(self) -> list[str]:
        return list(self.members)

    def read(self, key: str, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        """The member, its sub-array `array[index]` for leading integer indices, or rows [a, b) of the first
        axis after them, read from disk."""
        m = self.members[key]
        sub = m.shape[len(index):]
        count = int(np.prod(sub, dtype=np.int64))
        flat = 0
        for i, n in zip(index, m.shape):
            if not 0 <= i < n:
                raise IndexError(f"{key}: index {index} out of range for shape {m.shape}")
            flat = flat * n + i
        start = flat * count * m.dtype.itemsize
        if rows is not None:  # rows of the first axis after `index`
            row = count // sub[0] if sub and sub[0] else 0
            start += rows[0] * row * m.dtype.itemsize
            sub = (rows[1] - rows[0],) + sub[1:]
            count = row * sub[0]
        buf = np.empty(count * m.dtype.itemsize, np.uint8)
        pread_into(self._fd, buf, m.offset + start, self.path, key)
        self._crc_update(m, start, memoryview(buf))
        return buf.view(m.dtype).reshape(sub)

    def _crc_update(self, m: Member, start: int, data: memoryview) -> None:
        if start != m._crc_pos:
            return  # out of order: cannot verify this pass
        m._crc_val = zlib.crc32(data, m._crc_val)
        m._crc_pos += len(data)
        if m._crc_pos == m.nbytes and m._crc_val != m.crc:
            raise CheckpointError(describe(self.path, m.key, f"CRC-32 {m.crc:08x}", f"{m._crc_val:08x}",
                                           "corrupt member data"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _parse_npy_header(head: bytes, path: str, key: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if head[:6] != b"\x93NUMPY":
        raise CheckpointError(describe(path, key, "an npy header", repr(head[:6]), "corrupt member"))
    major = head[6]
    if major == 1:
        hlen, base = struct.unpack("<H", head[8:10])[0], 10
    elif major in (2, 3):
        hlen, base = struct.unpack("<I", head[8:12])[0], 12
    else:
        raise CheckpointError(describe(path, key, "npy format 1-3", f"version {major}"))
    try:
        d = ast.literal_eval(head[base:base + hlen].decode("latin1"))
        descr, fortran, shape = d["descr"], d["fortran_order"], tuple(int(s) for s in d["shape"])
        raw_dtype = np.dtype(descr)
    except Exception as e:
        raise CheckpointError(describe(path, key, what=f"unreadable npy header ({e})")) from None
    if raw_dtype.hasobject:
        raise CheckpointError(describe(path, key, "a numeric array", "an object array",
                                       "refusing to unpickle"))
    if fortran:
        raise CheckpointError(describe(path, key, "C order", "Fortran order"))
    dtype = dtypes.from_npy_descr(raw_dtype)
    if dtype is None:
        raise CheckpointError(describe(path, key, "float32, float16 or bfloat16 (|V2)", str(raw_dtype),
                                       "unsupported dtype"))
    return dtype, shape, base + hlen


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """An npy v1.0 header exactly as np.save writes it (bfloat16 as '<V2')."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (dtypes.to_npy_descr(dtype), tuple(shape))
    pad = 64 - (10 + len(d) + 1) % 64
    d = d + " " * (pad % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


class NpzWriter:
    """Writes members one at a time; each member's data may arrive in chunks (e.g. layer by layer)."""

    def __init__(self, fileobj: BinaryIO):
        self._zf = zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(self, key: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> None:
        with self._zf.open(key + ".npy", "w", force_zip64=True) as f:
            f.write(npy_header(dtype, shape))
            write_chunks(f, key, dtype, shape, chunks)

    def close(self) -> None:
        self._zf.close()
