"""SigLIP So400m/14-style ViT: conv patch embedding, learned position embedding, pre-LN blocks, final LayerNorm.

Axis letters (parity.config): B batch, T image tokens, P patch size, Dv width, Fv mlp width, Nv heads, Hv head dim.
Attribute names follow the canonical keys (`img/Transformer/encoderblock/LayerNorm_0/scale` ->
`img.Transformer.encoderblock.LayerNorm_0.scale`, stacked [Lv, Dv]). The projector (`img/head`) is projector.py.
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from parity import points
from parity.config import VisionConfig
from parity.jax_impl.attention import _param, scan, stack


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, statistics in float32, cast back at the end."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = _param(dim)
        self.bias = _param(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32, or float64 for a float64 model
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)).astype(x.dtype)


class Dense(nnx.Module):
    """kernel [*in, *out] (einsum-shaped, e.g. [Dv, Nv, Hv]) and bias [*out]."""

    def __init__(self, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]):
        self.kernel = _param(*kernel_shape)
        self.bias = _param(*bias_shape)


class MultiHeadDotProductAttention(nnx.Module):
    """Standard MHA with biases, no mask. query/key/value.kernel [Dv, Nv, Hv], out.kernel [Nv, Hv, Dv]."""

    def __init__(self, cfg: VisionConfig):
        d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
        self.query, self.key, self.value = (Dense((d, n, h), (n, h)) for _ in range(3))
        self.out = Dense((n, h, d), (d,))
        self.scale = h**-0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = (
            (x @ p.kernel[...].reshape(d, -1)).reshape(b, t, *p.bias[...].shape) + p.bias[...]
            for p in (self.query, self.key, self.value)
        )  # "BTD,DNH->BTNH" (free reshapes)
        s = jnp.einsum("BTNH,BSNH->BNTS", q, k) * jnp.asarray(self.scale, q.dtype)
        p = jax.nn.softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=-1).astype(v.dtype)
        o = jnp.einsum("BNTS,BSNH->BTNH", p, v).reshape(b, t, -1)
        return o @ self.out.kernel[...].reshape(-1, d) + self.out.bias[...]  # "BTNH,NHD->BTD"


class MlpBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig):
        self.Dense_0 = Dense((cfg.width, cfg.mlp_dim), (cfg.mlp_dim,))
        self.Dense_1 = Dense((cfg.mlp_dim, cfg.width), (cfg.width,))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(x @ self.Dense_0.kernel[...] + self.Dense_0.bias[...], approximate=True)  # "BTD,DF->BTF"
        return h @ self.Dense_1.kernel[...] + self.Dense_1.bias[...]  # "BTF,FD->BTD"


class Encoder1DBlock(nnx.Module):
    """x += MHA(LN_0(x)); x += MLP(LN_1(x))."""

    def __init__(self, cfg: VisionConfig):
        self.LayerNorm_0 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(cfg)
        self.LayerNorm_1 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MlpBlock_0 = MlpBlock(cfg)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x float[B, T, Dv] -> (residual stream after the block, {"attn": attention branch, "out": residual
        stream}: points.IMG_BLOCK_POINTS' kinds)."""
        a = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x))
        x = x + a
        x = x + self.MlpBlock_0(self.LayerNorm_1(x))
        return x, {"attn": a, "out": x}


class Transformer(nnx.Module):
    def __init__(self, cfg: VisionConfig):
        self.depth = cfg.depth
        self.encoderblock = stack(lambda: Encoder1DBlock(cfg), cfg.depth)
        self.encoder_norm = LayerNorm(cfg.width, cfg.norm_eps)

    def __call__(self, x: jax.Array, capture: Collection[str], out: dict) -> jax.Array:
        """x float[B, T, Dv] -> encoder-normed float[B, T, Dv]; captured block points into `out`."""
        kinds = [k for k, name in points.IMG_BLOCK_POINTS.items() if any(name(i) in capture for i in range(self.depth))]

        def body(block, x, _):
            x, aux = block(x)
            return x, {k: aux[k] for k in kinds}  # only what is captured

        x, ys = scan(self.encoderblock, body, x, None)
        for k, name in points.IMG_BLOCK_POINTS.items():
            out.update({name(i): ys[k][i] for i in range(self.depth) if name(i) in capture})
        return self.encoder_norm(x)


class PatchEmbedding(nnx.Module):
    """Conv P x P, stride P, VALID, with bias. kernel [P, P, 3, Dv] (HWIO)."""

    def __init__(self, cfg: VisionConfig):
        self.kernel = _param(cfg.patch_size, cfg.patch_size, 3, cfg.width)
        self.bias = _param(cfg.width)
        self.patch = cfg.patch_size

    def __call__(self, image: jax.Array) -> jax.Array:
        """image float[B, H, W, 3] -> float[B, T, Dv], patches row-major (h outer, w inner)."""
        x = jax.lax.conv_general_dilated(
            image, self.kernel[...], (self.patch, self.patch), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x + self.bias[...]
        return x.reshape(x.shape[0], -1, x.shape[-1])


class SigLIP(nnx.Module):
    """Image encoder; `head` (the projector) is attached by the PaliGemma model to mirror `img/head`."""

    def __init__(self, cfg: VisionConfig):
        self.embedding = PatchEmbedding(cfg)
        self.pos_embedding = _param(1, cfg.num_patches, cfg.width)
        self.Transformer = Transformer(cfg)

    def __call__(self, image: jax.Array, capture: Collection[str], out: dict) -> jax.Array:
        """image float[B, H, W, 3] in [-1, 1] -> encoder-normed float[B, T, Dv]."""
        x = self.embedding(image.astype(self.pos_embedding[...].dtype))
        if points.IMG_PATCH_EMBED in capture:
            out[points.IMG_PATCH_EMBED] = x
        x = x + self.pos_embedding[...]
        if points.IMG_POS_EMBED in capture:
            out[points.IMG_POS_EMBED] = x
        x = self.Transformer(x, capture, out)
        if points.IMG_FINAL_NORM in capture:
            out[points.IMG_FINAL_NORM] = x
        return x
