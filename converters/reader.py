"""The reader protocol: what a checkpoint format gives converters.checkpoint, and nothing more.

Every format's reader (npz_io.NpzReader, safetensors_io.SafetensorsReader, orbax_io.OrbaxReader) implements it and
says so (`assert isinstance(..., TensorReader)` is checked in tests; each class subclasses it). The checkpoint
reads through these methods only, so a new format is a new reader, not a new branch in every method.
Keys are the file's own names; which names a format's keys are (canonical, HF) is the checkpoint's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from converters import blocks


@runtime_checkable
class TensorReader(Protocol):
    path: str

    def keys(self) -> list[str]:
        """Every tensor's name, in file order."""
        ...

    def shape(self, key: str) -> tuple[int, ...]:
        """From the header: nothing is read."""
        ...

    def dtype(self, key: str) -> np.dtype: ...

    def read(self, key: str, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor; `tensor[index]` for leading integer indices; rows [a, b) of the first axis after them.
        Read front to back, a tensor's stored checksum (npz CRC-32, ours in orbax metadata) is verified on the way."""
        ...

    def verify_all(self) -> None:
        """Finish verifying the stored checksum of every tensor that front-to-back reads have not covered (reading
        what is needed); CheckpointError on a mismatch. A no-op for a format without checksums."""
        ...

    def close(self) -> None: ...


def scan(reader: TensorReader, key: str, visit: Callable[[np.ndarray], None]) -> None:
    """Every element of `key`, front to back in blocks of at most blocks.BLOCK_BYTES, to `visit`."""
    shape = reader.shape(key)
    if not shape:
        visit(reader.read(key).reshape(-1))
        return
    for index, rows in blocks.blocks(shape, reader.dtype(key).itemsize):
        visit(reader.read(key, index, rows).reshape(-1))
