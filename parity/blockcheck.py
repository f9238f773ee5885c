"""Checks of a single-block call's arguments (api.vit_block / api.llm_block), shared by every implementation.

Framework-free (numpy only): parity/torch_impl and parity/jax_impl both import it, so a bad block index or input
shape gets the same one-line message whichever side runs it.
"""

from __future__ import annotations

import numpy as np


def check_block(i: int, depth: int, x: np.ndarray, width: int, what: str) -> None:
    """ValueError unless 0 <= i < depth and x is float[B, T, width]. what: "ViT" or "LLM" (named in the message)."""
    if not 0 <= i < depth:
        raise ValueError(f"{what} block {i}: the model has blocks 0..{depth - 1}")
    if np.ndim(x) != 3 or np.shape(x)[-1] != width:
        raise ValueError(f"{what} block input: expected float[B, T, {width}], found shape {np.shape(x)}")
