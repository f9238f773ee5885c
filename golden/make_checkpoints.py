"""Writes the tiny checkpoints shipped in golden/ (deterministic: seeds fixed, values from the spec).

    python golden/make_checkpoints.py        # rewrites golden/tiny-*.npz

Released-style files: every key under `params/`, layers stacked, bf16 stored as numpy void |V2 (PaliGemma 2 ships
only `*.b16.npz`). The values are random (no real weights can be shipped or fetched here).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from parity import spec
from parity.config import TINY_VARIANTS

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = {  # file -> (variant, dtype, seed)
    "tiny-pg1-mqa.npz": ("tiny-pg1-mqa", np.float32, 1),
    "tiny-pg2-gqa.b16.npz": ("tiny-pg2-gqa", ml_dtypes.bfloat16, 2),
    # the 28B query scale 1/sqrt(D/N) with D/N != H, sliding window 8 (golden bundle tiny-pg2-28b.bundle)
    "tiny-pg2-28b.b16.npz": ("tiny-pg2-28b", ml_dtypes.bfloat16, 3),
}


def main() -> None:
    for fname, (name, dtype, seed) in SHIPPED.items():
        # chaotic: the weights the shipped files were made with (the default became realistic after they shipped)
        params = spec.random_params(TINY_VARIANTS[name], seed=seed, dtype=dtype, weights="chaotic")
        path = os.path.join(HERE, fname)
        np.savez(path, **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
