"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder: embedder, blocks, final norm, tied logits.

Axis letters (parity.config): B batch, T length, D width, F mlp width, V vocabulary rows, L depth.
Attribute names follow the canonical keys: `llm/layers/mlp/gating_einsum` -> `llm.layers.{i}.mlp.gating_einsum`, the
stacked [L, 2, D, F] parameter unrolled into one per layer and run by a loop (`scan`; jax_impl keeps the stack).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from parity import points
from parity.config import TextConfig
from parity.torch_impl.attention import Attention, _param, rope_angles, scan, softcap, stack


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + scale), computed in float32 and cast back at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = _param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 for a float64 model
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.scale.to(y.dtype))).to(x.dtype)


class Embedder(nn.Module):
    """Tied embedding table input_embedding [V, D]: encode (x sqrt(D)) and decode (x @ E^T)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_embedding = _param(cfg.vocab_size, cfg.width)

    def encode(self, tokens: torch.Tensor, normalizer_dtype: str) -> torch.Tensor:
        """tokens int[B, T] -> float[B, T, D] scaled by sqrt(D).

        "param": sqrt(D) rounded to the table dtype (via float32, as transformers does) and multiplied in it;
        "float32": multiplied in float32, then cast to the table dtype."""
        e = F.embedding(tokens, self.input_embedding)
        root = torch.tensor(math.sqrt(e.shape[-1]), dtype=torch.float32, device=e.device)
        if normalizer_dtype == "param":
            return e * root.to(e.dtype)
        return (e.float() * root).to(e.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.input_embedding.t()  # "BTD,VD->BTV"


class FeedForward(nn.Module):
    """GeGLU: (gelu_tanh(x W_gate) * (x W_up)) W_down. gating_einsum [2, D, F] ([0] gate, [1] up); linear [F, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gating_einsum = _param(2, cfg.width, cfg.mlp_dim, storage=(1, 0, 2))  # stored [D, 2, F]
        self.linear = _param(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, f = self.linear.shape[1], self.linear.shape[0]
        gu = x @ self.gating_einsum.permute(1, 0, 2).reshape(d, 2 * f)  # "BTD,CDF->BTCF" (C = 2), free view
        gate, up = gu[..., :f], gu[..., f:]
        h = F.gelu(gate, approximate="tanh")
        h = h * up if h.requires_grad else h.mul_(up)  # without autograd, gelu's buffer takes the product
        return h @ self.linear  # "BTF,FD->BTD"


class Block(nn.Module):
    """Pre-norm residual block; Gemma 2 adds post-attention and post-ffw norms on the branch outputs."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gemma2 = cfg.gemma2
        self.pre_attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.pre_ffw_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        if cfg.gemma2:
            self.post_attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
            self.post_ffw_norm = RMSNorm(cfg.width, cfg.norm_eps)

    def forward(self, x, angles, mask, *, attn_softcap, cache=None, write_index=None):
        """x float[B, T, D]; angles: rope_angles of the positions; mask bool[B, T, S] (the local mask in local
        layers). Returns (x, {"attn", "mlp", "out"}: points.LLM_BLOCK_POINTS' kinds, the updated cache or None)."""
        a, cache = self.attn(
            self.pre_attention_norm(x), angles, mask, attn_softcap=attn_softcap, cache=cache, write_index=write_index
        )
        if self.gemma2:
            a = self.post_attention_norm(a)
        x = x + a
        m = self.mlp(self.pre_ffw_norm(x))
        if self.gemma2:
            m = self.post_ffw_norm(m)
        x = x + m
        return x, {"attn": a, "mlp": m, "out": x}, cache


def block_mask(masks: dict, local: bool) -> torch.Tensor:
    """The mask of one layer: masks["local"] in local layers when a window applies, else masks["global"]."""
    if masks.get("local") is None:
        return masks["global"]
    return masks["local"] if local else masks["global"]


class Gemma(nn.Module):
    """The decoder stack. Parameters: embedder.input_embedding, layers.{i}.* (the stacked [L, ...] unrolled),
    final_norm.scale."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = Embedder(cfg)
        self.layers = stack(lambda: Block(cfg), cfg.depth)
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps)

    def local_layers(self) -> list[bool]:
        """bool[L]: Gemma 2's local (sliding-window) layers."""
        return [self.cfg.is_local_layer(i) for i in range(self.cfg.depth)]

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) float[B, T, 1, H] of int positions [B, T] (with origin), shared by every layer."""
        return rope_angles(positions, self.cfg.head_dim, self.cfg.rope_base, dtype)

    def forward(
        self, x, positions, masks, *, attn_softcap, capture: Collection[str], out: dict, caches=None, write_index=None
    ):
        """x float[B, T, D] -> (final-normed float[B, T, D], updated caches or None); captured points into `out`.
        masks: {"global": bool[B,T,S], "local": ... or None}; caches: {"k", "v": float[L, B, S, K, H]} or None."""
        depth = self.cfg.depth
        kinds = [k for k, name in points.LLM_BLOCK_POINTS.items() if any(name(i) in capture for i in range(depth))]
        angles = self.angles(positions, x.dtype)

        def body(block, carry, xs):
            x, kv = carry
            local, i = xs
            cache = None if kv is None else (*kv, i)
            x, aux, cache = block(
                x, angles, block_mask(masks, local), attn_softcap=attn_softcap, cache=cache, write_index=write_index
            )
            return (x, None if cache is None else cache[:2]), {k: aux[k] for k in kinds}  # only what is captured

        kv = None if caches is None else (caches["k"], caches["v"])  # the whole stack, written in place per layer
        (x, kv), ys = scan(self.layers, body, (x, kv), (self.local_layers(), range(depth)))
        for k, name in points.LLM_BLOCK_POINTS.items():
            out.update({name(i): ys[k][i] for i in range(depth) if name(i) in capture})
        x = self.final_norm(x)
        if points.LLM_FINAL_NORM in capture:
            out[points.LLM_FINAL_NORM] = x
        return x, None if kv is None else {"k": kv[0], "v": kv[1]}

    def logits(self, x: torch.Tensor, capped: bool) -> torch.Tensor:
        """float[B, T, D] (final-normed) -> float[B, T, V]; the final softcap when `capped` and configured."""
        y = self.embedder.decode(x)
        if capped and self.cfg.final_softcap:
            y = softcap(y, self.cfg.final_softcap)
        return y
