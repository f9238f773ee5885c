"""SigLIP So400m/14-style ViT: conv patch embedding, learned position embedding, pre-LN blocks, final LayerNorm.

Axis letters (parity.config): B batch, T image tokens, P patch size, Dv width, Fv mlp width, Nv heads, Hv head dim.
Attribute names follow the canonical keys (`img/Transformer/encoderblock/LayerNorm_0/scale` ->
`img.Transformer.encoderblock.{i}.LayerNorm_0.scale`, the stacked [Lv, Dv] unrolled). The projector (`img/head`) is
projector.py.

`dtype_mm` is big_vision's `img.dtype_mm` (`models/vit.py`): when given, every Dense and the patch Conv cast their
input, kernel and bias to it (flax `promote_dtype(..., dtype=dtype_mm)`), and everything else follows the operands'
dtypes as jnp's promotion does: the position-embedding add and the residual adds promote (a float32 position
embedding keeps the residual stream float32), a LayerNorm computes in float32 and returns the promotion of its input,
scale and bias (flax `_normalize`). None (every forward run) casts nothing.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from parity import points
from parity.config import VisionConfig
from parity.torch_impl.attention import _param, scan, stack


def _mm(dtype_mm: torch.dtype | None, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a Dense/Conv as big_vision computes with them: cast to `dtype_mm` (autograd casts a float32
    leaf's gradient back from the float16 one, as jax's convert_element_type does); None: as they are."""
    return ts if dtype_mm is None else tuple(t.to(dtype_mm) for t in ts)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias (torch's layer_norm). Mixed dtypes (a float16 input, float32
    parameters: a trained leaf beside float16 frozen ones) as flax's LayerNorm: computed in float32, returned in the
    promotion of input, scale and bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = _param(dim)
        self.bias = _param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.scale.dtype == self.bias.dtype:
            return F.layer_norm(x, x.shape[-1:], self.scale, self.bias, self.eps)
        out = torch.promote_types(torch.promote_types(x.dtype, self.scale.dtype), self.bias.dtype)
        wide = torch.promote_types(out, torch.float32)
        y = F.layer_norm(x.to(wide), x.shape[-1:], self.scale.to(wide), self.bias.to(wide), self.eps)
        return y.to(out)


class Dense(nn.Module):
    """kernel [*in, *out] (einsum-shaped, e.g. [Dv, Nv, Hv]) and bias [*out]."""

    def __init__(self, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]):
        super().__init__()
        self.kernel = _param(*kernel_shape)
        self.bias = _param(*bias_shape)

    def operands(self, dtype_mm: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        """(kernel, bias) as big_vision's Dense computes with them (`_mm`)."""
        return _mm(dtype_mm, self.kernel, self.bias)


class MultiHeadDotProductAttention(nn.Module):
    """Standard MHA with biases, no mask. query/key/value.kernel [Dv, Nv, Hv], out.kernel [Nv, Hv, Dv]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
        self.query, self.key, self.value = (Dense((d, n, h), (n, h)) for _ in range(3))
        self.out = Dense((n, h, d), (d,))
        self.scale = h**-0.5

    def forward(self, x: torch.Tensor, dtype_mm: torch.dtype | None = None) -> torch.Tensor:
        b, t, d = x.shape
        (x,), ops = _mm(dtype_mm, x), [p.operands(dtype_mm) for p in (self.query, self.key, self.value, self.out)]
        q, k, v = (
            F.linear(x, kernel.reshape(d, -1).t(), bias.reshape(-1)).view(b, t, *bias.shape) for kernel, bias in ops[:3]
        )  # "BTD,DNH->BTNH" (+ bias)
        s = torch.einsum("BTNH,BSNH->BNTS", q, k) * self.scale
        p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype)
        o = torch.einsum("BNTS,BSNH->BTNH", p, v).reshape(b, t, -1)
        return F.linear(o, ops[3][0].reshape(-1, d).t(), ops[3][1])  # "BTNH,NHD->BTD" (+ bias)


class MlpBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.Dense_0 = Dense((cfg.width, cfg.mlp_dim), (cfg.mlp_dim,))
        self.Dense_1 = Dense((cfg.mlp_dim, cfg.width), (cfg.width,))

    def forward(self, x: torch.Tensor, dtype_mm: torch.dtype | None = None) -> torch.Tensor:
        ((x,), (k0, b0), (k1, b1)) = _mm(dtype_mm, x), self.Dense_0.operands(dtype_mm), self.Dense_1.operands(dtype_mm)
        h = F.gelu(F.linear(x, k0.t(), b0), approximate="tanh")  # "BTD,DF->BTF"
        return F.linear(h, k1.t(), b1)  # "BTF,FD->BTD"


class Encoder1DBlock(nn.Module):
    """x += MHA(LN_0(x)); x += MLP(LN_1(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.LayerNorm_0 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(cfg)
        self.LayerNorm_1 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MlpBlock_0 = MlpBlock(cfg)

    def forward(
        self, x: torch.Tensor, dtype_mm: torch.dtype | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x float[B, T, Dv] -> (residual stream after the block, {"attn": attention branch, "out": residual
        stream}: points.IMG_BLOCK_POINTS' kinds)."""
        a = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x), dtype_mm)
        x = x + a
        x = x + self.MlpBlock_0(self.LayerNorm_1(x), dtype_mm)
        return x, {"attn": a, "out": x}


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.depth = cfg.depth
        self.encoderblock = stack(lambda: Encoder1DBlock(cfg), cfg.depth)
        self.encoder_norm = LayerNorm(cfg.width, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, capture: Collection[str], out: dict, dtype_mm: torch.dtype | None = None
    ) -> torch.Tensor:
        """x float[B, T, Dv] -> encoder-normed float[B, T, Dv]; captured block points into `out`."""
        kinds = [k for k, name in points.IMG_BLOCK_POINTS.items() if any(name(i) in capture for i in range(self.depth))]

        def body(block, x, _):
            x, aux = block(x, dtype_mm)
            return x, {k: aux[k] for k in kinds}  # only what is captured

        x, ys = scan(self.encoderblock, body, x, None)
        for k, name in points.IMG_BLOCK_POINTS.items():
            out.update({name(i): ys[k][i] for i in range(self.depth) if name(i) in capture})
        return self.encoder_norm(x)


class PatchEmbedding(nn.Module):
    """Conv P x P, stride P, VALID, with bias. kernel [P, P, 3, Dv] (HWIO)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.kernel = _param(cfg.patch_size, cfg.patch_size, 3, cfg.width)
        self.bias = _param(cfg.width)
        self.patch = cfg.patch_size

    def forward(self, image: torch.Tensor, dtype_mm: torch.dtype | None = None) -> torch.Tensor:
        """image float[B, H, W, 3] -> float[B, T, Dv], patches row-major (h outer, w inner)."""
        image, kernel, bias = _mm(dtype_mm, image, self.kernel, self.bias)
        x = F.conv2d(image.permute(0, 3, 1, 2), kernel.permute(3, 2, 0, 1), bias, stride=self.patch)
        return x.flatten(2).transpose(1, 2)


class SigLIP(nn.Module):
    """Image encoder; `head` (the projector) is attached by the PaliGemma model to mirror `img/head`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embedding = PatchEmbedding(cfg)
        self.pos_embedding = _param(1, cfg.num_patches, cfg.width)
        self.Transformer = Transformer(cfg)

    def forward(
        self, image: torch.Tensor, capture: Collection[str], out: dict, dtype_mm: torch.dtype | None = None
    ) -> torch.Tensor:
        """image float[B, H, W, 3] in [-1, 1] -> encoder-normed float[B, T, Dv] (in the residual stream's dtype)."""
        x = self.embedding(image.to(self.pos_embedding.dtype if dtype_mm is None else dtype_mm), dtype_mm)
        if points.IMG_PATCH_EMBED in capture:
            out[points.IMG_PATCH_EMBED] = x
        x = x + self.pos_embedding
        if points.IMG_POS_EMBED in capture:
            out[points.IMG_POS_EMBED] = x
        x = self.Transformer(x, capture, out, dtype_mm)
        if points.IMG_FINAL_NORM in capture:
            out[points.IMG_FINAL_NORM] = x
        return x
