"""Records the golden bundles shipped in golden/ from transformers (the outside reference), under the
`transformers` convention, on CPU in float32: every capture point and 8 greedy steps (ignore_eos) with their step
logits and KV cache, on golden/tiny-inputs.npz.

    python golden/record_goldens.py            # (re)records golden/*.bundle; prints what changed
    parity golden check golden/tiny-pg2-gqa.bundle --impl jax

The checkpoints come from golden/make_checkpoints.py (random values from parity.spec.random_params).
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from parity import golden  # noqa: E402

BUNDLES = {  # bundle -> checkpoint: PaliGemma 1 (MQA); PaliGemma 2 (GQA, softcaps, window 8 < the 30-token
    # sequence); PaliGemma 2 with the 28B query scale 1/sqrt(D/N), D/N != H
    "tiny-pg1-mqa.bundle": "tiny-pg1-mqa.npz",
    "tiny-pg2-gqa.bundle": "tiny-pg2-gqa.b16.npz",
    "tiny-pg2-28b.bundle": "tiny-pg2-28b.b16.npz",
}
INPUTS = os.path.join(HERE, "tiny-inputs.npz")
STEPS = 8


def main() -> None:
    for bundle, ckpt in BUNDLES.items():
        out = os.path.join(HERE, bundle)
        rep = golden.record(os.path.join(HERE, ckpt), INPUTS, out, impl="transformers", convention="transformers",
                            steps=STEPS, update=os.path.exists(out))
        golden.render_record(rep)


if __name__ == "__main__":
    main()
