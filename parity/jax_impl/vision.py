"""SigLIP So400m/14-style ViT: conv patch embedding, learned position embedding, pre-LN blocks, final LayerNorm.

Axis letters (parity.config): B batch, T image tokens, P patch size, Dv width, Fv mlp width, Nv heads, Hv head dim.
Attribute names follow the canonical keys (`img/Transformer/encoderblock/LayerNorm_0/scale` ->
`img.Transformer.encoderblock.LayerNorm_0.scale`, stacked [Lv, Dv]). The projector (`img/head`) is projector.py.

`dtype_mm` is big_vision's `img.dtype_mm` (`models/vit.py`): when given, every Dense and the patch Conv cast their
input, kernel and bias to it (flax `promote_dtype(..., dtype=dtype_mm)`), and everything else follows the operands'
dtypes as jnp's promotion does: the position-embedding add and the residual adds promote (a float32 position
embedding keeps the residual stream float32), a LayerNorm computes in float32 and returns the promotion of its input,
scale and bias (flax `_normalize`). None (every forward run) casts nothing.
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from parity import points
from parity.config import VisionConfig
from parity.jax_impl.attention import _param, scan, stack


def _mm(dtype_mm, *ts: jax.Array) -> tuple[jax.Array, ...]:
    """The operands of a Dense/Conv as big_vision computes with them: cast to `dtype_mm` (jax's convert_element_type
    casts a float32 leaf's gradient back from the float16 one); None: as they are."""
    return ts if dtype_mm is None else tuple(t.astype(dtype_mm) for t in ts)


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, statistics in float32 (float64 for float64), returned in the
    promotion of input, scale and bias (flax's LayerNorm: a float32 scale makes a float16 input's output float32)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = _param(dim)
        self.bias = _param(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        wide = jnp.promote_types(x.dtype, jnp.float32)
        y = x.astype(wide)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        out = jnp.result_type(x, self.scale[...], self.bias[...])
        return (y * self.scale[...].astype(wide) + self.bias[...].astype(wide)).astype(out)


class Dense(nnx.Module):
    """kernel [*in, *out] (einsum-shaped, e.g. [Dv, Nv, Hv]) and bias [*out]."""

    def __init__(self, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]):
        self.kernel = _param(*kernel_shape)
        self.bias = _param(*bias_shape)

    def operands(self, dtype_mm) -> tuple[jax.Array, ...]:
        """(kernel, bias) as big_vision's Dense computes with them (`_mm`)."""
        return _mm(dtype_mm, self.kernel[...], self.bias[...])


class MultiHeadDotProductAttention(nnx.Module):
    """Standard MHA with biases, no mask. query/key/value.kernel [Dv, Nv, Hv], out.kernel [Nv, Hv, Dv]."""

    def __init__(self, cfg: VisionConfig):
        d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
        self.query, self.key, self.value = (Dense((d, n, h), (n, h)) for _ in range(3))
        self.out = Dense((n, h, d), (d,))
        self.scale = h**-0.5

    def __call__(self, x: jax.Array, dtype_mm=None) -> jax.Array:
        b, t, d = x.shape
        (x,), ops = _mm(dtype_mm, x), [p.operands(dtype_mm) for p in (self.query, self.key, self.value, self.out)]
        q, k, v = (
            (x @ kernel.reshape(d, -1)).reshape(b, t, *bias.shape) + bias for kernel, bias in ops[:3]
        )  # "BTD,DNH->BTNH" (free reshapes)
        s = jnp.einsum("BTNH,BSNH->BNTS", q, k) * jnp.asarray(self.scale, q.dtype)
        p = jax.nn.softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=-1).astype(v.dtype)
        o = jnp.einsum("BNTS,BSNH->BTNH", p, v).reshape(b, t, -1)
        return o @ ops[3][0].reshape(-1, d) + ops[3][1]  # "BTNH,NHD->BTD"


class MlpBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig):
        self.Dense_0 = Dense((cfg.width, cfg.mlp_dim), (cfg.mlp_dim,))
        self.Dense_1 = Dense((cfg.mlp_dim, cfg.width), (cfg.width,))

    def __call__(self, x: jax.Array, dtype_mm=None) -> jax.Array:
        ((x,), (k0, b0), (k1, b1)) = _mm(dtype_mm, x), self.Dense_0.operands(dtype_mm), self.Dense_1.operands(dtype_mm)
        h = jax.nn.gelu(x @ k0 + b0, approximate=True)  # "BTD,DF->BTF"
        return h @ k1 + b1  # "BTF,FD->BTD"


class Encoder1DBlock(nnx.Module):
    """x += MHA(LN_0(x)); x += MLP(LN_1(x))."""

    def __init__(self, cfg: VisionConfig):
        self.LayerNorm_0 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(cfg)
        self.LayerNorm_1 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MlpBlock_0 = MlpBlock(cfg)

    def __call__(self, x: jax.Array, dtype_mm=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x float[B, T, Dv] -> (residual stream after the block, {"attn": attention branch, "out": residual
        stream}: points.IMG_BLOCK_POINTS' kinds)."""
        a = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x), dtype_mm)
        x = x + a
        x = x + self.MlpBlock_0(self.LayerNorm_1(x), dtype_mm)
        return x, {"attn": a, "out": x}


class Transformer(nnx.Module):
    def __init__(self, cfg: VisionConfig):
        self.depth = cfg.depth
        self.encoderblock = stack(lambda: Encoder1DBlock(cfg), cfg.depth)
        self.encoder_norm = LayerNorm(cfg.width, cfg.norm_eps)

    def __call__(self, x: jax.Array, capture: Collection[str], out: dict, dtype_mm=None) -> jax.Array:
        """x float[B, T, Dv] -> encoder-normed float[B, T, Dv]; captured block points into `out`."""
        kinds = [k for k, name in points.IMG_BLOCK_POINTS.items() if any(name(i) in capture for i in range(self.depth))]

        def body(block, x, _):
            x, aux = block(x, dtype_mm)
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

    def __call__(self, image: jax.Array, dtype_mm=None) -> jax.Array:
        """image float[B, H, W, 3] -> float[B, T, Dv], patches row-major (h outer, w inner)."""
        image, kernel, bias = _mm(dtype_mm, image, self.kernel[...], self.bias[...])
        x = jax.lax.conv_general_dilated(
            image, kernel, (self.patch, self.patch), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x + bias
        return x.reshape(x.shape[0], -1, x.shape[-1])


class SigLIP(nnx.Module):
    """Image encoder; `head` (the projector) is attached by the PaliGemma model to mirror `img/head`."""

    def __init__(self, cfg: VisionConfig):
        self.embedding = PatchEmbedding(cfg)
        self.pos_embedding = _param(1, cfg.num_patches, cfg.width)
        self.Transformer = Transformer(cfg)

    def __call__(self, image: jax.Array, capture: Collection[str], out: dict, dtype_mm=None) -> jax.Array:
        """image float[B, H, W, 3] in [-1, 1] -> encoder-normed float[B, T, Dv] (in the residual stream's dtype)."""
        x = self.embedding(image.astype(self.pos_embedding[...].dtype if dtype_mm is None else dtype_mm), dtype_mm)
        if points.IMG_PATCH_EMBED in capture:
            out[points.IMG_PATCH_EMBED] = x
        x = x + self.pos_embedding[...]
        if points.IMG_POS_EMBED in capture:
            out[points.IMG_POS_EMBED] = x
        x = self.Transformer(x, capture, out, dtype_mm)
        if points.IMG_FINAL_NORM in capture:
            out[points.IMG_FINAL_NORM] = x
        return x
