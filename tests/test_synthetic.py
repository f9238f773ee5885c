"""Synthetic weights (parity.synthetic through spec.random_params): the realistic default draws each leaf with the
documented statistics (checked against fan-ins written out by hand), chaotic reproduces the historical draws
(bit-exact against a shipped golden checkpoint), and a model on realistic weights has logits of unit scale."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from torch_fixtures import make_inputs

from parity import points, spec
from parity.config import TINY_VARIANTS

GQA = TINY_VARIANTS["tiny-pg2-gqa"]  # ViT D 32, MLP 48, 4 heads of 8; LLM D 48, 4 q / 2 kv heads of 16, F 96
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
MHA = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
MLP = "img/Transformer/encoderblock/MlpBlock_0"

# leaf -> (mean, std) by hand for tiny-pg2-gqa
EXPECTED = {
    "img/embedding/kernel": (0.0, 1 / math.sqrt(7 * 7 * 3)),  # lecun normal over the patch
    "img/pos_embedding": (0.0, 1 / math.sqrt(32)),
    f"{MHA}/query/kernel": (0.0, math.sqrt(2 / (32 + 32))),  # xavier: fan_in D, fan_out N*H
    f"{MHA}/out/kernel": (0.0, math.sqrt(2 / (32 + 32))),
    f"{MLP}/Dense_0/kernel": (0.0, math.sqrt(2 / (32 + 48))),
    f"{MLP}/Dense_1/kernel": (0.0, math.sqrt(2 / (48 + 32))),
    "img/head/kernel": (0.0, 1 / math.sqrt(32)),
    "llm/embedder/input_embedding": (0.0, 1 / math.sqrt(48)),
    "llm/layers/attn/q_einsum/w": (0.0, 1 / math.sqrt(48)),
    "llm/layers/attn/kv_einsum/w": (0.0, 1 / math.sqrt(48)),
    "llm/layers/attn/attn_vec_einsum/w": (0.0, 1 / math.sqrt(4 * 16)),
    "llm/layers/mlp/gating_einsum": (0.0, 1 / math.sqrt(48)),
    "llm/layers/mlp/linear": (0.0, 1 / math.sqrt(96)),
}


def test_realistic_is_the_default_and_draws_the_documented_statistics():
    p = spec.random_params(GQA, seed=0)
    assert p.keys() == spec.canonical_shapes(GQA).keys()
    for key, (mean, std) in EXPECTED.items():
        x = p[key].astype(np.float64)
        se = std / math.sqrt(x.size)  # standard error of the mean; the std's relative error is ~1/sqrt(2n)
        assert abs(x.mean() - mean) < 5 * se, key
        assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * x.size) + 0.01, (key, x.std(), std)
    # xavier uniform is bounded by sqrt(3) std
    assert np.abs(p[f"{MLP}/Dense_0/kernel"]).max() <= math.sqrt(6 / 80)
    for key, x in p.items():
        if "LayerNorm" in key or "encoder_norm" in key:
            assert abs(x.mean() - (1.0 if key.endswith("scale") else 0.0)) < 0.05, key
        elif key.endswith("norm/scale"):  # RMSNorm offsets (applied as 1 + scale)
            assert abs(x.mean()) < 0.05 and 0.02 < x.std() < 0.1, key
        elif key.endswith("bias"):
            assert np.abs(x).max() < 0.06, key


def test_chaotic_reproduces_the_shipped_golden_checkpoint():
    """golden/make_checkpoints.py draws chaotic weights: the shipped tiny-pg1-mqa.npz (float32, seed 1) is them."""
    shipped = np.load(os.path.join(GOLDEN, "tiny-pg1-mqa.npz"))
    p = spec.random_params(TINY_VARIANTS["tiny-pg1-mqa"], seed=1, weights="chaotic")
    for key, x in p.items():
        np.testing.assert_array_equal(shipped[spec.NPZ_PREFIX + key], x)
    # an explicit scale alone keeps its historical meaning: chaotic N(0, scale^2)
    a, b = spec.random_params(GQA, seed=2, scale=0.1), spec.random_params(GQA, seed=2, weights="chaotic", scale=0.1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="weights"):
        spec.random_params(GQA, weights="trained")


def test_realistic_weights_give_logits_of_unit_scale():
    """Scaled embeddings of unit RMS and the tied head give logits of std ~1: no one-hot softmax (the chaotic
    weights' failure mode for KL), no vanishing signal."""
    from parity.conventions import PRESETS
    from parity.torch_impl import api, build_model

    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    model = build_model(cfg, PRESETS["big_vision"], params=spec.random_params(cfg, seed=1))
    logits = api.forward(model, make_inputs(cfg), [points.LOGITS])[points.LOGITS]
    assert 0.3 < float(logits.std()) < 3.0, logits.std()
