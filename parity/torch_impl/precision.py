"""The float32 matmul precision a run computes under: set per call, restored after, never process-wide.
Mirrored by parity/jax_impl/precision.py; api.py, train.py, backward.py and stream.py enter it in every run call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("highest", "high", "default")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch's float32 matmul precision set to `precision` ("highest" / "high") inside the block and restored after,
    so nothing process-wide outlives a call; "default" leaves torch's setting as it is. Every run call enters it."""
    previous = torch.get_float32_matmul_precision()
    if precision != "default":
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
