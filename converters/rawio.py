"""Raw byte I/O shared by every file parser: regular files only, positioned reads with read-ahead, chunked writes,
and strict JSON.

Hostile input rules that hold for every reader built on this module:
- only regular files are opened (a FIFO, socket or device would block `open()` or never end): `open_regular`
  opens without blocking and checks the file type before a single byte is read;
- a read never runs past the end of the file and an OSError while reading becomes one line naming the file;
- JSON is parsed strictly (`read_json`, `loads_strict`): no duplicate keys, no NaN/Infinity, bounded size,
  UTF-8 only; every failure is one `ParityError` line.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from parity.errors import CheckpointError, ParityError, describe

try:  # ISA-L's CRC-32 (same polynomial and values as zlib's, ~7x faster here): every npz and orbax byte is summed
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values, slower
    import zlib

    crc32 = zlib.crc32

_CHUNK = 64 << 20
MAX_JSON_BYTES = 64 << 20  # config.json, sidecar, index: a few KB to a few MB in practice


def open_regular(path: str | os.PathLike, error: type[ParityError] = CheckpointError) -> int:
    """An O_RDONLY descriptor of `path`, refusing anything but a regular file before reading from it.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the flag is cleared again for
    regular files (where it has no effect anyway)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(describe(path, what=f"cannot open ({e.strerror or e})")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(describe(path, "a regular file", _file_kind(st.st_mode), "refusing to read it"))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | os.PathLike, limit: int, error: type[ParityError] = CheckpointError) -> bytes:
    """The whole content of a regular file of at most `limit` bytes."""
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(describe(path, expected=f"at most {limit} bytes", found=f"{size} bytes", what="file too large"))
        data = os.pread(fd, size + 1, 0)
    except OSError as e:
        raise error(describe(path, what=f"cannot read ({e.strerror or e})")) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(describe(path, what="file grew while being read"))
    return data


def pread_exact(fd: int, n: int, offset: int, path: str, key: str | None = None) -> bytes:
    """Exactly `n` bytes at `offset` (CheckpointError when the file ends first or the read fails)."""
    if offset < 0 or n < 0:
        raise CheckpointError(describe(path, key, what=f"corrupt: negative offset {offset} or length {n}"))
    try:
        b = os.pread(fd, n, offset)
    except (OSError, OverflowError) as e:
        raise CheckpointError(describe(path, key, what=f"cannot read at offset {offset} ({_why(e)})")) from None
    if len(b) != n:
        raise CheckpointError(
            describe(path, key, f"{n} bytes at offset {offset}", f"{len(b)}", "unexpected end of file (truncated)")
        )
    return b


def pread_into(fd: int, buf: np.ndarray, offset: int, path: str, key: str) -> None:
    """Fill `buf` from `offset`, then ask the kernel to read ahead what usually comes next, so the disk works
    while the caller transforms this block."""
    view, done = memoryview(buf), 0
    try:
        while done < len(view):
            n = os.preadv(fd, [view[done : done + _CHUNK]], offset + done)
            if n <= 0:
                raise CheckpointError(describe(path, key, what="unexpected end of file (truncated)"))
            done += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset + done, 256 << 20, os.POSIX_FADV_WILLNEED)
    except (OSError, OverflowError) as e:
        raise CheckpointError(describe(path, key, what=f"cannot read at offset {offset + done} ({_why(e)})")) from None


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def write_chunks(f: BinaryIO, key: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> int:
    """Write one tensor given as consecutive C-order chunks; checks dtype and the total against `shape`."""
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    written = 0
    for c in chunks:
        if c.dtype != dtype:
            raise TypeError(f"{key}: chunk dtype {c.dtype}, expected {dtype}")
        c = np.ascontiguousarray(c)
        f.write(memoryview(c.reshape(-1).view(np.uint8)))
        written += c.nbytes
    if written != expected:
        raise ValueError(f"{key}: wrote {written} bytes, expected {expected} for {list(shape)}")
    return written


# -- strict JSON --------------------------------------------------------------------------------------------------
class JSONProblem(ValueError):
    """Raised by `loads_strict`; the message says what is wrong, the caller names the file."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise JSONProblem(f"duplicate key {k!r}")
        d[k] = v
    return d


def _no_constant(name: str):
    raise JSONProblem(f"{name} is not JSON")


def loads_strict(data: bytes | str) -> Any:
    """JSON with no duplicate keys, no NaN/Infinity, UTF-8 only; nesting deep enough to exhaust the parser's
    recursion is an error too (JSONProblem)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise JSONProblem(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except JSONProblem:
        raise
    except RecursionError:
        raise JSONProblem("nested too deeply") from None
    except ValueError as e:
        raise JSONProblem(f"invalid JSON ({e})") from None


def read_json(
    path: str | os.PathLike,
    error: type[ParityError] = CheckpointError,
    what: str = "JSON file",
    object_only: bool = True,
) -> Any:
    """A strict JSON document from a regular file of at most MAX_JSON_BYTES; one-line `error` otherwise."""
    data = read_regular(path, MAX_JSON_BYTES, error)
    try:
        d = loads_strict(data)
    except JSONProblem as e:
        raise error(describe(path, what=f"unreadable {what}: {e}")) from None
    if object_only and not isinstance(d, dict):
        raise error(describe(path, expected="a JSON object at the top level", found=json_type(d), what=f"not a {what}"))
    return d


def json_type(x: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(x), type(x).__name__)
