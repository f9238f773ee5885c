"""The float32 matmul precision a run computes under: set per call, restored after, never process-wide.
Mirrored by parity/torch_impl/precision.py; api.py, train.py, backward.py and stream.py enter it in every run call."""

from __future__ import annotations

import jax

PRECISIONS = ("highest", "high", "default")


def matmul_precision(precision: str):
    """jax's default matmul precision set to `precision` inside the block and restored after, so nothing
    process-wide outlives a call ("highest" / "high" / "default"). Every run call enters it."""
    return jax.default_matmul_precision(precision)
