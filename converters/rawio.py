"""Raw byte I/O shared by the npz and safetensors layers: positioned reads with read-ahead, chunked writes."""
from __future__ import annotations

import os
from typing import BinaryIO, Iterable

import numpy as np

from parity.errors import CheckpointError, describe

_CHUNK = 64 << 20


def pread_into(fd: int, buf: np.ndarray, offset: int, path: str, key: str) -> None:
    """Fill `buf` from `offset`, then ask the kernel to read ahead what usually comes next, so the disk works
    while the caller transforms this block."""
    view, done = memoryview(buf), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + _CHUNK]], offset + done)
        if n <= 0:
            raise CheckpointError(describe(path, key, what="unexpected end of file (truncated)"))
        done += n
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset + done, 256 << 20, os.POSIX_FADV_WILLNEED)


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
