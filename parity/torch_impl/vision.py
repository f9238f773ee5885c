"""SigLIP So400m/14-style ViT: conv patch embedding, learned position embedding, pre-LN blocks, final LayerNorm.

Axis letters (parity.config): B batch, T image tokens, P patch size, Dv width, Fv mlp width, Nv heads, Hv head dim.
Attribute names follow the canonical keys (`img/Transformer/encoderblock/LayerNorm_0/scale` ->
`img.Transformer.encoderblock.{i}.LayerNorm_0.scale`, the stacked [Lv, Dv] unrolled). The projector (`img/head`) is
projector.py.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from parity import points
from parity.config import VisionConfig
from parity.torch_impl.attention import _param, scan, stack


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias (torch's layer_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = _param(dim)
        self.bias = _param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.scale, self.bias, self.eps)


class Dense(nn.Module):
    """kernel [*in, *out] (einsum-shaped, e.g. [Dv, Nv, Hv]) and bias [*out]."""

    def __init__(self, kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]):
        super().__init__()
        self.kernel = _param(*kernel_shape)
        self.bias = _param(*bias_shape)


class MultiHeadDotProductAttention(nn.Module):
    """Standard MHA with biases, no mask. query/key/value.kernel [Dv, Nv, Hv], out.kernel [Nv, Hv, Dv]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
        self.query, self.key, self.value = (Dense((d, n, h), (n, h)) for _ in range(3))
        self.out = Dense((n, h, d), (d,))
        self.scale = h**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            F.linear(x, p.kernel.reshape(d, -1).t(), p.bias.reshape(-1)).view(b, t, *p.bias.shape)
            for p in (self.query, self.key, self.value)
        )  # "BTD,DNH->BTNH" (+ bias)
        s = torch.einsum("BTNH,BSNH->BNTS", q, k) * self.scale
        p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype)
        o = torch.einsum("BNTS,BSNH->BTNH", p, v).reshape(b, t, -1)
        return F.linear(o, self.out.kernel.reshape(-1, d).t(), self.out.bias)  # "BTNH,NHD->BTD" (+ bias)


class MlpBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.Dense_0 = Dense((cfg.width, cfg.mlp_dim), (cfg.mlp_dim,))
        self.Dense_1 = Dense((cfg.mlp_dim, cfg.width), (cfg.width,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.Dense_0.kernel.t(), self.Dense_0.bias), approximate="tanh")  # "BTD,DF->BTF"
        return F.linear(h, self.Dense_1.kernel.t(), self.Dense_1.bias)  # "BTF,FD->BTD"


class Encoder1DBlock(nn.Module):
    """x += MHA(LN_0(x)); x += MLP(LN_1(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.LayerNorm_0 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(cfg)
        self.LayerNorm_1 = LayerNorm(cfg.width, cfg.norm_eps)
        self.MlpBlock_0 = MlpBlock(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x float[B, T, Dv] -> (residual stream after the block, {"attn": attention branch, "out": residual
        stream}: points.IMG_BLOCK_POINTS' kinds)."""
        a = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x))
        x = x + a
        x = x + self.MlpBlock_0(self.LayerNorm_1(x))
        return x, {"attn": a, "out": x}


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.depth = cfg.depth
        self.encoderblock = stack(lambda: Encoder1DBlock(cfg), cfg.depth)
        self.encoder_norm = LayerNorm(cfg.width, cfg.norm_eps)

    def forward(self, x: torch.Tensor, capture: Collection[str], out: dict) -> torch.Tensor:
        """x float[B, T, Dv] -> encoder-normed float[B, T, Dv]; captured block points into `out`."""
        kinds = [k for k, name in points.IMG_BLOCK_POINTS.items() if any(name(i) in capture for i in range(self.depth))]

        def body(block, x, _):
            x, aux = block(x)
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

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image float[B, H, W, 3] -> float[B, T, Dv], patches row-major (h outer, w inner)."""
        x = F.conv2d(image.permute(0, 3, 1, 2), self.kernel.permute(3, 2, 0, 1), self.bias, stride=self.patch)
        return x.flatten(2).transpose(1, 2)


class SigLIP(nn.Module):
    """Image encoder; `head` (the projector) is attached by the PaliGemma model to mirror `img/head`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embedding = PatchEmbedding(cfg)
        self.pos_embedding = _param(1, cfg.num_patches, cfg.width)
        self.Transformer = Transformer(cfg)

    def forward(self, image: torch.Tensor, capture: Collection[str], out: dict) -> torch.Tensor:
        """image float[B, H, W, 3] in [-1, 1] -> encoder-normed float[B, T, Dv]."""
        x = self.embedding(image.to(self.pos_embedding.dtype))
        if points.IMG_PATCH_EMBED in capture:
            out[points.IMG_PATCH_EMBED] = x
        x = x + self.pos_embedding
        if points.IMG_POS_EMBED in capture:
            out[points.IMG_POS_EMBED] = x
        x = self.Transformer(x, capture, out)
        if points.IMG_FINAL_NORM in capture:
            out[points.IMG_FINAL_NORM] = x
        return x
