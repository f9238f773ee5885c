"""Shared builders for the PyTorch tests: a batch whose rows differ in prefix length and padding."""

from __future__ import annotations

import numpy as np

B, L = 3, 14
PREFIX = (3, 6, 9)  # text tokens in the bidirectional prefix, per row
LENGTH = (14, 10, 12)  # real text tokens per row (right padding after)


def make_inputs(cfg, seed: int = 0, length=LENGTH, prefix=PREFIX) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = len(length)
    text = rng.integers(3, cfg.text.vocab_size, (b, L)).astype(np.int32)
    text[:, 0] = 2  # bos
    mask_ar = np.zeros((b, L), np.int32)
    mask_input = np.zeros((b, L), np.int32)
    for r in range(b):
        mask_ar[r, prefix[r] :] = 1
        mask_input[r, : length[r]] = 1
        text[r, length[r] :] = 0
    image = rng.uniform(-1, 1, (b, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input)


def valid_rows(cfg, inputs) -> np.ndarray:
    """bool[B, S]: real (non-padding) positions of [image ; text]."""
    b = inputs["text"].shape[0]
    return np.concatenate([np.ones((b, cfg.num_image_tokens)), inputs["mask_input"]], 1).astype(bool)
