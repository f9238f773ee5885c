"""Writes golden/tiny-inputs.npz: a 2-row batch for the tiny 28 px variants, built by the processor from two
synthetic images and prompts with different prefix lengths (row 1 is right-padded), in big_vision's convention;
and the same two images as golden/gradient.png and golden/checkerboard.png with golden/train.jsonl (big_vision's
fine-tuning lines naming them), for the training walk-through of docs/training.md.

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
    write_training_files()


def write_training_files() -> None:
    import json

    from PIL import Image

    lines = [("gradient.png", "caption en", "a smooth gradient"), ("checkerboard.png", "caption en", "a checkerboard")]
    for (name, _, _), image in zip(lines, images()):
        Image.fromarray(image).save(os.path.join(HERE, name))
    with open(os.path.join(HERE, "train.jsonl"), "w") as f:
        for name, prefix, suffix in lines:
            f.write(json.dumps({"image": name, "prefix": prefix, "suffix": suffix}) + "\n")


if __name__ == "__main__":
    main()
