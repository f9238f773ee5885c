"""Kaggle / big_vision `.npz`: read members lazily by their byte ranges (writing: converters.npz_write).

np.savez stores members uncompressed (ZIP_STORED), so a member is an npy header followed by raw C-order bytes at
a known offset of the archive: a layer of a stacked tensor is a contiguous byte range we read with os.pread.
Nothing is unpickled (object arrays are refused). CRC-32 of a member is verified whenever it is read front to
back (which the converters do), so corrupt data is caught without a second pass; `verify` completes the check of
what was read out of order or not at all. The directory is cross-checked against every local header, so a crafted
archive is refused exactly where np.load would refuse it (never read as another member).
"""

from __future__ import annotations

import ast
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from converters import dtypes
from converters.rawio import crc32, open_regular, pread_exact, pread_into
from converters.reader import TensorReader
from parity.errors import CheckpointError, describe

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, csize, usize, n, e
_ENCRYPTED, _DATA_DESCRIPTOR, _PATCHED, _STRONG, _UTF8 = 0x1, 0x8, 0x20, 0x40, 0x800
_MAX_NPY_HEADER = 10000  # what np.load accepts without allow_pickle (numpy's max_header_size)
_NPY_KEYS = {"descr", "fortran_order", "shape"}
_VERIFY_BLOCK = 16 << 20


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
    _span: tuple[int, int] = (0, 0)  # [local header, end of data): members may not share bytes
    verified: bool = False  # the CRC-32 of the whole member has been checked
    _deflated: tuple[int, int, int] | None = None  # (data offset, compressed size, npy header length)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class NpzReader(TensorReader):
    """Lazy, read-only view of an npz archive. `keys()` are the member names without `.npy`.

    Everything np.load (zipfile) would refuse is refused here too, before any data is read: a local header whose
    name, method, flags, CRC or sizes differ from the central directory's, encryption, compression, unknown zip
    versions, duplicate or overlapping members, npy headers with other keys or non-integer shapes. Weights must be
    float32/float16/bfloat16; `any_numeric=True` admits any plain numeric dtype and deflated members
    (np.savez_compressed inputs files, inflated on read within their declared size)."""

    def __init__(self, path: str | os.PathLike, any_numeric: bool = False):
        self.path = os.fspath(path)
        self._any_numeric = any_numeric
        self._fd = -1
        self._fd = open_regular(self.path)
        self.members: dict[str, Member] = {}
        try:
            self._size = os.fstat(self._fd).st_size
            for info, start_dir in self._directory():
                self._add(info, start_dir)
            self._check_overlaps()
        except BaseException:
            self.close()
            raise

    def _directory(self) -> list[tuple[zipfile.ZipInfo, int]]:
        f = os.fdopen(os.dup(self._fd), "rb")
        try:
            with zipfile.ZipFile(f) as zf:
                infos, start_dir = zf.infolist(), getattr(zf, "start_dir", self._size)
        except Exception as e:  # zipfile raises BadZipFile, but also OSError, UnicodeDecodeError, NotImplementedError,
            # struct.error, ValueError, EOFError on crafted directories: all mean the same to us
            raise CheckpointError(
                describe(
                    self.path, what=f"not a readable npz/zip archive, truncated or corrupt ({type(e).__name__}: {e})"
                )
            ) from None
        finally:
            f.close()
        if not infos:
            raise CheckpointError(describe(self.path, what="empty zip archive, not a checkpoint"))
        return [(i, start_dir) for i in infos]

    def _add(self, info: zipfile.ZipInfo, start_dir: int) -> None:
        name = info.filename
        if not name.endswith(".npy"):
            raise CheckpointError(describe(self.path, name, "an .npy member", "another file", "not an npz checkpoint"))
        key = name[:-4]
        if key in self.members:
            raise CheckpointError(
                describe(self.path, key, what="corrupt zip: the member appears twice in the central directory")
            )
        if info.flag_bits & (_ENCRYPTED | _STRONG):
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    "an unencrypted member",
                    "the encrypted flag",
                    "encrypted npz members are not supported",
                )
            )
        if info.flag_bits & _PATCHED:
            raise CheckpointError(describe(self.path, key, what="corrupt zip: compressed patched data (flag bit 5)"))
        deflated = info.compress_type == zipfile.ZIP_DEFLATED and self._any_numeric
        if info.compress_type != zipfile.ZIP_STORED and not deflated:
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    "an uncompressed (np.savez) member",
                    f"compression method {info.compress_type}",
                    "compressed members cannot be streamed; re-save with np.savez",
                )
            )
        if info.compress_size != info.file_size and not deflated:
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    f"a stored size equal to the size {info.file_size}",
                    info.compress_size,
                    "corrupt zip directory",
                )
            )
        start = self._check_local_header(info, key)
        if start + info.compress_size > min(self._size, start_dir):
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    f"{info.compress_size} bytes of data at offset {start}",
                    f"{max(0, min(self._size, start_dir) - start)} before the end of the member area",
                    "truncated or corrupt member",
                )
            )
        if deflated:
            head = self._inflate(key, start, info.compress_size, min(12 + _MAX_NPY_HEADER, info.file_size))
        else:
            head = pread_exact(self._fd, min(12 + _MAX_NPY_HEADER, info.file_size), start, self.path, key)
        dtype, shape, hlen = _parse_npy_header(head, self.path, key, self._any_numeric)
        m = Member(
            key,
            dtype,
            shape,
            start + hlen,
            info.CRC,
            _header=head[:hlen],
            _span=(info.header_offset, start + info.compress_size),
            _deflated=(start, info.compress_size, hlen) if deflated else None,
        )
        if hlen + m.nbytes != info.file_size:
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    f"{hlen + m.nbytes} bytes for {dtypes.name(dtype)}{list(shape)}",
                    f"{info.file_size} bytes",
                    "truncated or corrupt member",
                )
            )
        m._crc_val = crc32(m._header)
        m._crc_pos = 0
        self.members[key] = m

    def _check_local_header(self, info: zipfile.ZipInfo, key: str) -> int:
        """The local header must be the directory entry's own (np.load/zipfile refuse otherwise); returns the
        offset of the member's data."""
        raw = pread_exact(self._fd, _LOCAL_HEADER.size, info.header_offset, self.path, key)
        sig, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
        if sig != b"PK\x03\x04":
            raise CheckpointError(describe(self.path, key, what="corrupt zip: bad local file header"))
        tail = pread_exact(self._fd, name_len + extra_len, info.header_offset + _LOCAL_HEADER.size, self.path, key)
        raw_name, extra = tail[:name_len], tail[name_len:]
        try:
            local_name = raw_name.decode("utf-8" if flags & _UTF8 else "cp437")
        except UnicodeDecodeError:
            local_name = repr(raw_name)
        if local_name != info.orig_filename:
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    f"local header name {info.orig_filename!r}",
                    repr(local_name),
                    "corrupt zip: directory and local header differ",
                )
            )
        if method != info.compress_type:
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    f"compression method {info.compress_type}",
                    method,
                    "corrupt zip: directory and local header differ",
                )
            )
        if flags & (_ENCRYPTED | _STRONG):
            raise CheckpointError(
                describe(
                    self.path,
                    key,
                    "an unencrypted member",
                    "the encrypted flag",
                    "encrypted npz members are not supported",
                )
            )
        if not flags & _DATA_DESCRIPTOR:  # sizes and CRC are in the local header too: they must agree
            if 0xFFFFFFFF in (csize, usize):
                usize, csize = _zip64_sizes(extra, usize, csize)
            for what, local, central in (
                ("CRC-32", crc, info.CRC),
                ("size", usize, info.file_size),
                ("stored size", csize, info.compress_size),
            ):
                if local != central:
                    raise CheckpointError(
                        describe(
                            self.path,
                            key,
                            f"the directory's {what} {central}",
                            f"{local} in the local header",
                            "corrupt zip: directory and local header differ",
                        )
                    )
        return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def _inflate(self, key: str, start: int, csize: int, limit: int) -> bytes:
        """At most `limit` bytes of a deflated member (np.savez_compressed: small inputs files only)."""
        comp = pread_exact(self._fd, csize, start, self.path, key)
        try:
            return zlib.decompressobj(-15).decompress(comp, limit)
        except zlib.error as e:
            raise CheckpointError(describe(self.path, key, what=f"corrupt compressed member ({e})")) from None

    def _check_overlaps(self) -> None:
        spans = sorted((m._span, k) for k, m in self.members.items())
        for ((_, e0), k0), ((b1, _), k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(
                    describe(
                        self.path,
                        k1,
                        f"a member starting after {k0}'s end {e0}",
                        f"offset {b1}",
                        "corrupt zip: overlapping members",
                    )
                )

    def keys(self) -> list[str]:
        return list(self.members)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.members[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.members[key].dtype

    def read(self, key: str, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        """The member, its sub-array `array[index]` for leading integer indices, or rows [a, b) of the first
        axis after them, read from disk."""
        m = self.members[key]
        sub = m.shape[len(index) :]
        count = math.prod(sub)
        flat = 0
        for i, n in zip(index, m.shape):
            if not 0 <= i < n:
                raise IndexError(f"{key}: index {index} out of range for shape {m.shape}")
            flat = flat * n + i
        start = flat * count * m.dtype.itemsize
        if rows is not None:  # rows of the first axis after `index`
            if not (sub and 0 <= rows[0] <= rows[1] <= sub[0]):
                raise IndexError(f"{key}: rows {rows} out of range for shape {m.shape} at index {index}")
            row = count // sub[0] if sub and sub[0] else 0
            start += rows[0] * row * m.dtype.itemsize
            sub = (rows[1] - rows[0],) + sub[1:]
            count = row * sub[0]
        if m._deflated is not None:  # inflated whole, bounded by the declared size, CRC checked
            at, csize, hlen = m._deflated
            raw = self._inflate(key, at, csize, hlen + m.nbytes + 1)
            if len(raw) != hlen + m.nbytes:
                raise CheckpointError(
                    describe(self.path, key, f"{hlen + m.nbytes} bytes", f"{len(raw)}", "corrupt compressed member")
                )
            m._crc_pos, m._crc_val = 0, crc32(m._header)
            self._crc_update(m, 0, memoryview(raw)[hlen:])
            n = count * m.dtype.itemsize
            return np.frombuffer(raw, np.uint8, n, hlen + start).copy().view(m.dtype).reshape(sub)
        buf = np.empty(count * m.dtype.itemsize, np.uint8)
        pread_into(self._fd, buf, m.offset + start, self.path, key)
        self._crc_update(m, start, memoryview(buf))
        return buf.view(m.dtype).reshape(sub)

    def _crc_update(self, m: Member, start: int, data: memoryview) -> None:
        if start != m._crc_pos:
            return  # out of order: cannot verify this pass (`verify` completes it)
        m._crc_val = crc32(data, m._crc_val)
        m._crc_pos += len(data)
        if m._crc_pos == m.nbytes:
            if m._crc_val != m.crc:
                raise CheckpointError(
                    describe(self.path, m.key, f"CRC-32 {m.crc:08x}", f"{m._crc_val:08x}", "corrupt member data")
                )
            m.verified = True

    def verify(self, key: str, visit: Callable[[np.ndarray], None] | None = None) -> None:
        """Finish the CRC-32 check of a member: read what front-to-back reads have not covered yet (everything
        when `visit` is given: it sees the member's data in blocks)."""
        m = self.members[key]
        if m._deflated is not None:
            if visit is not None or not m.verified:
                data = self.read(key)
                if visit is not None:
                    visit(data.reshape(-1))
            return
        if visit is not None:
            m._crc_pos, m._crc_val = 0, crc32(m._header)
        elif m.verified:
            return
        if m._crc_pos == m.nbytes:  # empty member
            self._crc_update(m, m._crc_pos, memoryview(b""))
        item = m.dtype.itemsize
        step = max(item, _VERIFY_BLOCK // item * item)
        while m._crc_pos < m.nbytes:
            n = min(step, m.nbytes - m._crc_pos)
            buf = np.empty(n, np.uint8)
            pread_into(self._fd, buf, m.offset + m._crc_pos, self.path, key)
            self._crc_update(m, m._crc_pos, memoryview(buf))
            if visit is not None:
                visit(buf.view(m.dtype))

    def verify_all(self) -> None:
        """CRC-32 of every member not yet verified by front-to-back reads."""
        for k in self.members:
            self.verify(k)

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


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int]:
    """(uncompressed, compressed) sizes from a local header's zip64 extra field (only those stored as 0xFFFFFFFF)."""
    i = 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack("<HH", extra[i : i + 4])
        if tag == 1:
            body = extra[i + 4 : i + 4 + n]
            vals = [struct.unpack("<Q", body[j : j + 8])[0] for j in range(0, len(body) - 7, 8)]
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            break
        i += 4 + n
    return usize, csize


def _parse_npy_header(
    head: bytes, path: str, key: str, any_numeric: bool = False
) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) of an npy member, checked as strictly as numpy's own reader."""
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise CheckpointError(describe(path, key, "an npy header", repr(head[:6]), "corrupt member"))
    major, minor = head[6], head[7]
    if (major, minor) == (1, 0):
        hlen, base, enc = struct.unpack("<H", head[8:10])[0], 10, "latin1"
    elif (major, minor) in ((2, 0), (3, 0)) and len(head) >= 12:
        hlen, base, enc = struct.unpack("<I", head[8:12])[0], 12, "latin1" if major == 2 else "utf8"
    else:
        raise CheckpointError(
            describe(
                path, key, "npy format 1.0, 2.0 or 3.0", f"version {major}.{minor}", "corrupt or unsupported npy member"
            )
        )
    if hlen > _MAX_NPY_HEADER or base + hlen > len(head):
        raise CheckpointError(
            describe(
                path,
                key,
                f"an npy header of at most {min(_MAX_NPY_HEADER, len(head) - base)} bytes",
                f"{hlen} bytes",
                "corrupt member",
            )
        )
    try:
        d = ast.literal_eval(head[base : base + hlen].decode(enc))
    except Exception as e:  # SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError
        raise CheckpointError(describe(path, key, what=f"unreadable npy header ({type(e).__name__})")) from None
    if not isinstance(d, dict) or set(d) != _NPY_KEYS:
        found = sorted(map(repr, d)) if isinstance(d, dict) else type(d).__name__
        raise CheckpointError(
            describe(
                path,
                key,
                "an npy header with exactly the keys descr, fortran_order, shape",
                found,
                "corrupt member (numpy refuses it)",
            )
        )
    shape, fortran = d["shape"], d["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(
            describe(path, key, "a shape of non-negative integers", repr(shape), "corrupt npy header")
        )
    if type(fortran) is not bool:
        raise CheckpointError(describe(path, key, "fortran_order True or False", repr(fortran), "corrupt npy header"))
    try:
        raw_dtype = np.dtype(d["descr"]) if isinstance(d["descr"], str) else None
    except Exception:
        raw_dtype = None
    if raw_dtype is None:
        raise CheckpointError(
            describe(path, key, "a numpy dtype string", repr(d["descr"])[:80], "unreadable npy header")
        )
    if raw_dtype.hasobject:
        raise CheckpointError(describe(path, key, "a numeric array", "an object array", "refusing to unpickle"))
    if fortran:
        raise CheckpointError(describe(path, key, "C order", "Fortran order"))
    dtype = dtypes.from_npy_descr(raw_dtype, any_numeric)
    if dtype is None:
        expected = "a numeric dtype" if any_numeric else "float32, float16 or bfloat16 (|V2)"
        raise CheckpointError(describe(path, key, expected, str(raw_dtype), "unsupported dtype"))
    return dtype, shape, base + hlen
