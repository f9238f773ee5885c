"""Writes golden/tiny-inputs.npz: a 2-row batch for the tiny 28 px variants, built by the processor from two
synthetic images and prompts with different prefix lengths (row 1 is right-padded), in big_vision's convention.

    python golden/make_inputs.py
"""

from __future__ import annotations

import os

import numpy as np

from parity.config import TINY_VARIANTS
from parity.inputs import save_inputs
from parity.processor import Tokenizer, build_inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def images() -> list[np.ndarray]:
    y, x = np.mgrid[0:40, 0:40]
    a = np.stack([x * 6, y * 6, (x + y) * 3], -1).astype(np.uint8)  # gradients
    b = np.stack([(x // 5 + y // 5) % 2 * 255] * 3, -1).astype(np.uint8)  # a checkerboard
    return [a, b]


def main() -> None:
    tok = Tokenizer(os.path.join(HERE, "tokenizer.model"))
    batch = build_inputs(
        images(),
        ["caption en", "answer en where is the cat in this picture?"],
        tokenizer=tok,
        config=TINY_VARIANTS["tiny-pg2-gqa"],
    )
    path = os.path.join(HERE, "tiny-inputs.npz")
    save_inputs(path, batch)
    print(f"wrote {path}: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items()))


if __name__ == "__main__":
    main()
