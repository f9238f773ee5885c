"""PaliGemma 2 3B-224 shapes at reduced depth with random weights, and a batch for them (benchmarks/compare.py and
benchmarks/calibrate_profiles.py). Widths, heads, vocabulary (257152) and image size are the released ones; only the
number of ViT and LLM blocks is cut so that two float32 passes fit a 2-core CPU run."""

from __future__ import annotations

import dataclasses

import numpy as np

from parity import spec
from parity.config import VARIANTS, PaliGemmaConfig

WEIGHT_SCALE = 0.02  # chaotic: every leaf N(0, 0.02^2) (Gemma's initializer_range), norms included
WEIGHTS = ("realistic", "chaotic")


def reduced_pg2_3b(vision_depth: int = 2, text_depth: int = 2) -> PaliGemmaConfig:
    base = VARIANTS["paligemma2-3b-224"]
    return PaliGemmaConfig(
        f"paligemma2-3b-224-v{vision_depth}t{text_depth}",
        dataclasses.replace(base.vision, depth=vision_depth),
        dataclasses.replace(base.text, depth=text_depth),
    )


def random_weights(cfg: PaliGemmaConfig, seed: int = 0, weights: str = "realistic") -> dict[str, np.ndarray]:
    """realistic: per-leaf statistics like a release's (parity.synthetic); chaotic: the stress case, every leaf
    N(0, WEIGHT_SCALE^2)."""
    if weights == "chaotic":
        return spec.random_params(cfg, seed=seed, scale=WEIGHT_SCALE, weights="chaotic")
    return spec.random_params(cfg, seed=seed, weights=weights)


def batch(cfg: PaliGemmaConfig, seed: int = 0, lengths=(16, 11), prefix=(6, 9)) -> dict[str, np.ndarray]:
    """Two rows with different prefix lengths; the second right-padded."""
    rng = np.random.default_rng(seed)
    n = max(lengths)
    text = rng.integers(3, cfg.text.vocab_size, (len(lengths), n)).astype(np.int32)
    text[:, 0] = 2
    mask_ar = np.zeros_like(text)
    mask_input = np.zeros_like(text)
    for r, (length, p) in enumerate(zip(lengths, prefix)):
        mask_ar[r, p:] = 1
        mask_input[r, :length] = 1
        text[r, length:] = 0
    size = cfg.vision.image_size
    image = rng.uniform(-1, 1, (len(lengths), size, size, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input)
