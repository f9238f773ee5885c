"""Parameters as a stream of blocks: what both implementations load from, so a resident run never holds a second
copy of the model beside the framework's tensors.

A block is `(key, index, rows, values)`: `values` is `tensor[index][rows[0]:rows[1]]` of the canonical tensor `key`
(big_vision keys without `params/`, layers stacked on axis 0), `rows` None for the whole of `tensor[index]`. A
checkpoint streams its tensors this way (`converters.checkpoint.Checkpoint.blocks`: consecutive C-order blocks of at
most converters.blocks.BLOCK_BYTES, cast on read); a numpy dict is one block per tensor (`of`). Each implementation's
`load_canonical` checks `shapes` against the spec before touching the model, then copies block after block into the
tensors it has already allocated, dropping each block once copied: peak memory is the model plus one block.

numpy only (both implementations import it; it imports neither framework).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

Block = tuple[str, tuple[int, ...], tuple[int, int] | None, np.ndarray]


class _Shape(NamedTuple):
    """Stands in for an array in spec.check_params (np.shape reads `.shape`)."""

    shape: tuple[int, ...]


@dataclass
class ParamBlocks:
    """Canonical parameters to be loaded: their shapes (checked first) and their values as blocks (read once)."""

    shapes: dict[str, tuple[int, ...]]
    blocks: Iterable[Block]
    source: str = "params"

    def shape_view(self) -> dict[str, _Shape]:
        """{key: an object with `.shape`}: what spec.check_params takes, without any values."""
        return {k: _Shape(tuple(s)) for k, s in self.shapes.items()}


def of(params: Mapping[str, np.ndarray] | ParamBlocks, source: str = "params") -> ParamBlocks:
    """`params` as ParamBlocks: a numpy dict becomes one whole-tensor block per key."""
    if isinstance(params, ParamBlocks):
        return params

    def whole() -> Iterator[Block]:
        for k, v in params.items():
            yield k, (), None, v

    return ParamBlocks({k: tuple(np.shape(v)) for k, v in params.items()}, whole(), source)


def extent(shape: tuple[int, ...], index: tuple[int, ...], rows: tuple[int, int] | None) -> int:
    """How many elements of a tensor of `shape` the block (index, rows) covers."""
    sub = shape[len(index) :]
    n = int(np.prod(sub, dtype=np.int64))
    if rows is None or not sub:
        return n
    return n // sub[0] * (rows[1] - rows[0]) if sub[0] else 0


def is_whole(shape: tuple[int, ...], index: tuple[int, ...], rows: tuple[int, int] | None) -> bool:
    """Whether the block is the whole tensor."""
    return not index and (rows is None or not shape or tuple(rows) == (0, shape[0]))


class Coverage:
    """Counts the elements loaded per key, so a stream that skips or repeats part of a tensor is caught (a reader or
    model/spec disagreement, not a user error: AssertionError)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.done = dict.fromkeys(self.shapes, 0)

    def add(self, key: str, index: tuple[int, ...], rows: tuple[int, int] | None, values: np.ndarray) -> None:
        shape = self.shapes[key]
        n = extent(shape, index, rows)
        if np.size(values) != n:
            raise AssertionError(f"{key}: block {index} {rows} has {np.size(values)} elements, expected {n}")
        self.done[key] += n

    def check(self) -> None:
        short = {k: (d, int(np.prod(self.shapes[k], dtype=np.int64))) for k, d in self.done.items()}
        bad = {k: v for k, v in short.items() if v[0] != v[1]}
        if bad:
            raise AssertionError(f"parameters loaded incompletely (elements loaded, expected): {bad}")
