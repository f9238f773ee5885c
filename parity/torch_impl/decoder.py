"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder: embedder, blocks, final norm, tied logits.

Axis letters (parity.config): B batch, T length, D width, F mlp width, V vocabulary rows, L depth.
Module attribute names follow the canonical keys (`llm/layers/mlp/gating_einsum` -> `llm.layers.{i}.mlp.gating_einsum`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parity import monitor, points
from parity.config import TextConfig
from parity.torch_impl.attention import Attention, _param, rope_angles, softcap


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + scale), computed in float32 and cast back at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = _param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.scale.float())).to(x.dtype)


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

    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index = index
        self.local = cfg.is_local_layer(index)
        self.pre_attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.pre_ffw_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        if cfg.gemma2:
            self.post_attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
            self.post_ffw_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.gemma2 = cfg.gemma2

    def forward(self, x, positions, mask, *, attn_softcap, capture, out, cache=None, write_index=None, angles=None):
        """x float[B, T, D]; mask bool[B, T, S] (the local mask in local layers); angles: RoPE (cos, sin) of
        `positions` if already computed."""
        # Attention.
        a = self.attn(
            self.pre_attention_norm(x),
            positions,
            mask,
            attn_softcap=attn_softcap,
            cache=cache,
            write_index=write_index,
            angles=angles,
        )
        if self.gemma2:
            a = self.post_attention_norm(a)
        if (name := points.llm_block_attn(self.index)) in capture:
            out[name] = a
        x = x + a
        # Feed forward.
        m = self.mlp(self.pre_ffw_norm(x))
        if self.gemma2:
            m = self.post_ffw_norm(m)
        if (name := points.llm_block_mlp(self.index)) in capture:
            out[name] = m
        x = x + m
        if (name := points.llm_block_out(self.index)) in capture:
            out[name] = x
        return x


class Gemma(nn.Module):
    """The decoder stack. Parameters: embedder.input_embedding, layers.{i}.*, final_norm.scale."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = Embedder(cfg)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps)

    def forward(self, x, positions, masks, *, attn_softcap, capture, out, caches=None, write_index=None):
        """x float[B, T, D] -> final-normed float[B, T, D]. masks: {"global": bool[B,T,S], "local": ... or None}."""
        angles = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_base, x.dtype)  # shared by all layers
        for i, block in enumerate(self.layers):
            x = block(
                x,
                positions,
                self.block_mask(i, masks),
                attn_softcap=attn_softcap,
                capture=capture,
                out=out,
                cache=None if caches is None else caches[i],
                write_index=write_index,
                angles=angles,
            )
            if not torch.compiler.is_compiling():  # a compiled decode step stays one graph
                monitor.tick("block")
        x = self.final_norm(x)
        if points.LLM_FINAL_NORM in capture:
            out[points.LLM_FINAL_NORM] = x
        return x

    def block_mask(self, i: int, masks: dict) -> torch.Tensor:
        """The mask block i attends with: the local (sliding-window) one in local layers when built, else global."""
        local = masks.get("local")
        return local if self.layers[i].local and local is not None else masks["global"]

    def logits(self, x: torch.Tensor, capped: bool) -> torch.Tensor:
        """float[B, T, D] (final-normed) -> float[B, T, V]; the final softcap when `capped` and configured."""
        y = self.embedder.decode(x)
        if capped and self.cfg.final_softcap:
            y = softcap(y, self.cfg.final_softcap)
        return y
