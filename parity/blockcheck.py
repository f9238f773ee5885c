"""Checks of a single-block or unit call's arguments (api.vit_block / llm_block / unit), shared by every implementation.

Framework-free (numpy only): parity/torch_impl and parity/jax_impl both import it, so a bad block index or input
shape gets the same one-line message whichever side runs it.
"""

from __future__ import annotations

import numpy as np

from parity import points
from parity.config import PaliGemmaConfig


def check_block(i: int, depth: int, x: np.ndarray, width: int, what: str) -> None:
    """ValueError unless 0 <= i < depth and x is float[B, T, width]. what: "ViT" or "LLM" (named in the message)."""
    if not 0 <= i < depth:
        raise ValueError(f"{what} block {i}: the model has blocks 0..{depth - 1}")
    if np.ndim(x) != 3 or np.shape(x)[-1] != width:
        raise ValueError(f"{what} block input: expected float[B, T, {width}], found shape {np.shape(x)}")


def check_unit(point: str, config: PaliGemmaConfig, x: np.ndarray) -> None:
    """ValueError unless `point` is a unit between the blocks (points.graph_units) and x has its input point's
    shape (any batch; any sequence length where the text decides it)."""
    units = points.graph_units(config)
    if point not in units:
        raise ValueError(f"unit {point!r}: the units between the blocks are {', '.join(units)}")
    want = points.shapes(config)[units[point]]
    if np.ndim(x) != 3 or np.shape(x)[-1] != want[-1] or (isinstance(want[1], int) and np.shape(x)[1] != want[1]):
        shape = ", ".join(str(d) for d in want)
        raise ValueError(f"unit {point} input ({units[point]}): expected float[{shape}], found shape {np.shape(x)}")
