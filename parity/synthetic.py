"""Synthetic weights for tests and benchmarks: per-leaf statistics like a released checkpoint's ("realistic"), or
every leaf N(0, scale^2) ("chaotic", the stress case the harness began with).

No real weights can be fetched here, so the realistic statistics are derived from the architectures' initialisers
(the state a release starts training from) with the spread a trained model keeps around them. Per leaf, with
fan_in = the size of the axes a kernel contracts with its input, fan_out = the size of the axes it produces:

| leaf (canonical key)                        | draw                                | from                            |
|---------------------------------------------|-------------------------------------|---------------------------------|
| img/embedding/kernel (patch conv)           | N(0, 1/fan_in), fan_in = P*P*3      | flax Conv default: lecun_normal |
| img/pos_embedding                           | N(0, 1/D_vit) (std 0.029 at 1152)   | big_vision vit posemb "learn"   |
| ViT q/k/v/out kernels, MlpBlock Dense_0/1   | U(+-sqrt(6/(fan_in+fan_out)))       | big_vision vit: xavier_uniform  |
| img/head/kernel (projector)                 | N(0, 1/fan_in)                      | see below                       |
| every bias (ViT, projector)                 | N(0, 0.01^2)                        | init zeros / N(0, 1e-6): small  |
| LayerNorm scale / bias                      | 1 + N(0, 0.05^2) / N(0, 0.01^2)     | init ones / zeros               |
| Gemma q/kv/attn_vec/gating/linear kernels   | N(0, 1/fan_in) (0.021 at D=2304)    | Gemma: normal ~ 1/sqrt(fan_in)  |
| RMSNorm scale (stored as an offset: 1 + s)  | N(0, 0.05^2)                        | init zeros                      |
| llm/embedder/input_embedding                | N(0, 1/D)                           | see below                       |

(Gemma's HF initializer_range is 0.02, i.e. 1/sqrt(fan_in) at fan_in ~2500.)

Choices that are ours, and why:
- The embedding table: std 1/sqrt(D), so the text stream the model sees (E[token] * sqrt(D)) has unit RMS per
  element, the scale every block's RMSNorm and the tied head are built around: tied logits x_norm . E^T then have
  std ~1 per vocabulary entry (a few units at the top, like a trained model's, and no one-hot softmax). At D = 2304
  that is 0.021, the same order as Gemma's initializer_range (0.02).
- The projector is zero-initialised in PaliGemma (P1 §3), which a trained model is not: N(0, 1/fan_in) maps the
  ViT's normalised output (unit RMS) to unit-RMS image tokens, the same scale as the scaled text embeddings.
- Norm scales: a trained model's sit near their init but not on it (an exact init would hide a convention error
  that only shows when the scale is not 1, or not 0); 0.05 is a spread, not a measurement.
- Biases: 0.01, small against activations of unit scale, nonzero so a dropped bias still shows.

Chaotic: every leaf N(0, scale^2), norms included (LayerNorm scales near 0, RMSNorm scales as offsets of +-0.3):
activations that grow and shrink block to block, the stress case for error amplification.
"""

from __future__ import annotations

import math

import numpy as np

WEIGHTS = ("realistic", "chaotic")
CHAOTIC_SCALE = 0.3  # the fixtures' historical default
BIAS_STD = 0.01
NORM_STD = 0.05
LN_BIAS_STD = 0.01


def _fans(key: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of one kernel piece (the per-layer shape, without the depth axis and the split axis)."""
    if key.endswith("embedding/kernel"):  # [P, P, 3, D]
        return math.prod(shape[:-1]), shape[-1]
    if key.endswith("out/kernel") or key.endswith("attn_vec_einsum/w"):  # [N, H, D]
        return shape[0] * shape[1], shape[2]
    if key.endswith("query/kernel") or key.endswith("key/kernel") or key.endswith("value/kernel"):  # [D, N, H]
        return shape[0], shape[1] * shape[2]
    if key.endswith("q_einsum/w") or key.endswith("kv_einsum/w"):  # [N, D, H] / [K, D, H]
        return shape[-2], shape[0] * shape[-1]
    return shape[-2], shape[-1]  # [in, out]: Dense, head, gating (one of the two), linear


def leaf_rule(key: str, piece: tuple[int, ...]) -> tuple[str, float, float]:
    """(distribution "normal" | "uniform", mean, std) of one leaf under the realistic statistics (module docstring);
    `piece` is the shape of one layer of it (without the leading depth axis; gating/kv without their split axis)."""
    if key == "llm/embedder/input_embedding":
        return "normal", 0.0, 1 / math.sqrt(piece[-1])
    if key == "img/pos_embedding":
        return "normal", 0.0, 1 / math.sqrt(piece[-1])
    if "LayerNorm" in key or "encoder_norm" in key:
        return ("normal", 1.0, NORM_STD) if key.endswith("scale") else ("normal", 0.0, LN_BIAS_STD)
    if key.endswith("norm/scale"):  # Gemma RMSNorm: applied as (1 + scale)
        return "normal", 0.0, NORM_STD
    if key.endswith("bias"):
        return "normal", 0.0, BIAS_STD
    fan_in, fan_out = _fans(key, piece)
    if key.startswith("img/Transformer/"):  # big_vision ViT: xavier_uniform for attention and MLP kernels
        return "uniform", 0.0, math.sqrt(2 / (fan_in + fan_out))
    return "normal", 0.0, 1 / math.sqrt(fan_in)


def piece_shape(key: str, shape: tuple[int, ...], layered: bool) -> tuple[int, ...]:
    """The shape one initialiser call sees: without the depth axis, and without the split axis of the stacked
    gating (2, D, F) and kv (2, K, D, H) kernels."""
    s = shape[1:] if layered else shape
    if key.endswith("gating_einsum") or key.endswith("kv_einsum/w"):
        s = s[1:]
    return tuple(s)


def draw(
    rng: np.random.Generator, key: str, shape: tuple[int, ...], piece: tuple[int, ...], weights: str, scale: float
) -> np.ndarray:
    """float32 values of shape `shape` (a whole leaf or a chunk of one) for leaf `key` whose per-layer piece is
    `piece`. Realistic: `scale` multiplies the deviation from the mean (1 = the documented statistics)."""
    if weights == "chaotic":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    if weights != "realistic":
        raise ValueError(f"weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    dist, mean, std = leaf_rule(key, piece)
    std *= scale
    if dist == "uniform":
        limit = math.sqrt(3) * std
        x = rng.random(shape, dtype=np.float32) * np.float32(2 * limit) - np.float32(limit)
    else:
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return x + np.float32(mean) if mean else x


def resolve(weights: str | None, scale: float | None) -> tuple[str, float]:
    """(weights, scale) from a caller's choice: an explicit `scale` alone keeps its historical meaning (chaotic
    N(0, scale^2)); nothing given is realistic."""
    if weights is None:
        weights = "chaotic" if scale is not None else "realistic"
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    if scale is None:
        scale = CHAOTIC_SCALE if weights == "chaotic" else 1.0
    return weights, scale
