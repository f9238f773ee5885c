"""The blocks the converters stream: every tensor as consecutive C-order blocks of at most BLOCK_BYTES.

A block is a run of whole layers, a layer, a layer piece, or a run of rows of one of them (`block_shape`), so peak
memory is bounded by a few blocks whatever the model size. A transpose between layouts (the spec's `T 1 0` on the
MLP kernels, the largest pieces) is done block by block too: `transposed_columns` builds columns [a, b) of a
matrix, transposed, from row bands of it read in order (one pass when the whole piece fits in a block).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

BLOCK_BYTES = 64 << 20
BAND_BYTES = 16 << 20


def plan(shape: tuple[int, ...], itemsize: int, budget: int | None = None) -> tuple[int, int]:
    """(k, rows): blocks index axes 0..k-1 one at a time and take `rows` rows of axis k (at least one): the
    first axis whose one index fits in `budget` (default BLOCK_BYTES, read at call time)."""
    budget = BLOCK_BYTES if budget is None else budget
    for k in range(len(shape)):
        inner = int(np.prod(shape[k + 1 :], dtype=np.int64)) * itemsize
        if inner <= budget or k == len(shape) - 1:
            return k, max(1, min(shape[k], budget // max(inner, 1)))
    return 0, 1  # a 0-d array


def block_shape(shape: tuple[int, ...], itemsize: int, budget: int | None = None) -> tuple[int, ...]:
    """The shape of a full block (the zarr chunk shape of our orbax arrays)."""
    k, rows = plan(shape, itemsize, budget)
    return (1,) * k + (rows,) + tuple(shape[k + 1 :]) if shape else ()


def blocks(
    shape: tuple[int, ...], itemsize: int, budget: int | None = None
) -> Iterator[tuple[tuple[int, ...], tuple[int, int]]]:
    """(leading index, (first row, end row) of the next axis) of each block, in C order."""
    k, rows = plan(shape, itemsize, budget)
    for prefix in itertools.product(*(range(n) for n in shape[:k])):
        for a in range(0, shape[k], rows):
            yield tuple(prefix), (a, min(shape[k], a + rows))


def transposed_columns(
    read_rows: Callable[[int, int], np.ndarray],
    n_rows: int,
    n_cols: int,
    *,
    cols: tuple[int, int],
    dtype: np.dtype,
    band_bytes: int | None = None,
) -> np.ndarray:
    """M[:, a:b].T for `cols` (a, b) of a row-major (n_rows, n_cols) matrix M given by `read_rows(r0, r1)` ->
    M[r0:r1], read in bands of about `band_bytes` (default BAND_BYTES)."""
    band_bytes = BAND_BYTES if band_bytes is None else band_bytes
    a, b = cols
    out = np.empty((b - a, n_rows), dtype)
    step = max(1, band_bytes // max(1, n_cols * np.dtype(dtype).itemsize))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        transpose_into(out[:, r0:r1], read_rows(r0, r1)[:, a:b])
    return out


def transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """dst[...] = src.T for 2-D arrays, copied in cache-sized tiles (as parity.spec.transpose_copy), with no
    temporary."""
    t = src.T
    for i in range(0, dst.shape[0], tile):
        for j in range(0, dst.shape[1], tile):
            dst[i : i + tile, j : j + tile] = t[i : i + tile, j : j + tile]
