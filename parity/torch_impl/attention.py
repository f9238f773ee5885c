"""Gemma attention pieces: RoPE, prefix-LM and sliding-window masks, softcap, grouped-query attention.

Axis letters (parity.config): B batch, T query length, S key length (the whole cache when decoding), D width,
N query heads, K kv heads, G = N / K query heads per kv head, H head dim.
Query head n reads kv head n // G (big_vision's `BTKGH` grouping, transformers' `repeat_kv`).
Mirrors parity/jax_impl/attention.py function for function; layers are one module each (`stack`, the canonical
depth axis unrolled) and run by a Python loop with jax.lax.scan's signature (`scan`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from parity import monitor
from parity.config import TextConfig


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in the op order of every reference. Without autograd the tanh and the product work in
    place on the quotient: one buffer instead of three (these are the largest activations, [B, S, V] logits)."""
    y = x / cap
    if y.requires_grad:
        return torch.tanh(y) * cap
    return y.tanh_().mul_(cap)


# -- RoPE ----------------------------------------------------------------------------------------------------------
def rope_angles(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) float[B, T, 1, H] in `dtype` for int positions [B, T]. The decoder computes them once per call
    and every layer applies them (all layers rotate by the same angles).

    Angles in float32 as `p * (1 / base^(2i/H))`, cos/sin cast to the activation dtype (transformers' formula;
    big_vision divides by the timescale instead, which differs in the last ulp of a few angles).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, T, H/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, H]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Half-split rotary embedding of x float[B, T, N, H] by `angles` = rope_angles(...) (cos, sin)."""
    cos, sin = angles
    h = x.shape[-1]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Half-split rotary embedding in one call. x: float[B, T, N, H]; positions: int[B, T]."""
    return apply_rope(x, rope_angles(positions, x.shape[-1], base, x.dtype))


def positions_from_mask(input_mask: torch.Tensor, origin: int) -> torch.Tensor:
    """RoPE positions cumsum(input_mask) - 1 + origin (0: big_vision, 1: transformers). int64[B, S]."""
    return torch.cumsum(input_mask.long(), dim=-1) - 1 + origin


# -- masks (bool, True = may attend) -------------------------------------------------------------------------------
def prefix_lm_mask(input_mask: torch.Tensor, mask_ar: torch.Tensor) -> torch.Tensor:
    """big_vision `make_attn_mask`: bool[B, S, S]; row i sees key j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]
    and both are real tokens. mask_ar [[0 0 0 1 1 1]] is a prefix-LM: 3 bidirectional tokens, then causal."""
    car = torch.cumsum(mask_ar.long(), dim=-1)
    valid = input_mask.bool()
    return (car[:, None, :] <= car[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def sliding_window_mask(
    mask: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    bidirectional: torch.Tensor | None = None,
    rule: str = "transformers",
) -> torch.Tensor:
    """Local-layer rule of a reference, on positions without the origin; mask & what the rule keeps.

    "transformers" (5.x): keys with q - k < window, except pairs of the same bidirectional block (`bidirectional`),
    which stay visible. "keras_hub": a symmetric band |q - k| <= window - 1, which does not exempt the image+prefix
    block (`bidirectional` is not used).

    mask: bool[B, T, S]; q_pos: int[B, T]; k_pos: int[B, S]; bidirectional: bool[B, T, S] or None."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    if rule == "keras_hub":
        return mask & (d.abs() < window)
    if rule != "transformers":
        raise ValueError(f"unknown sliding-window rule {rule!r}")
    near = d < window
    if bidirectional is not None:
        near = near | bidirectional
    return mask & near


def same_block(mask_ar: torch.Tensor) -> torch.Tensor:
    """bool[B, S, S]: tokens i, j share a bidirectional block (equal cumsum(mask_ar))."""
    car = torch.cumsum(mask_ar.long(), dim=-1)
    return car[:, :, None] == car[:, None, :]


# -- parameters and stacks -----------------------------------------------------------------------------------------
def _param(*shape: int, storage: tuple[int, ...] | None = None) -> nn.Parameter:
    """A parameter of canonical `shape` whose memory is laid out in the axis order `storage` (a permutation of the
    axes), so that the matmul views used in forward are free (no weight copy per call)."""
    if storage is None:
        return nn.Parameter(torch.zeros(shape), requires_grad=False)
    stored = torch.zeros([shape[a] for a in storage])
    inverse = [storage.index(a) for a in range(len(shape))]
    return nn.Parameter(stored.permute(inverse), requires_grad=False)


def stack(make: Callable[[], nn.Module], depth: int) -> nn.ModuleList:
    """`depth` copies of a block, named `.{i}.` (the canonical layout's leading depth axis, unrolled; load.py)."""
    return nn.ModuleList([make() for _ in range(depth)])


def scan(layers: nn.ModuleList, body: Callable, carry, xs):
    """The loop jax.lax.scan runs in jax_impl: `body(layer, carry, x) -> (carry, y)` over the layers and `xs` (a tuple
    of per-layer sequences, or None), y a dict. Returns (carry, ys) with ys[k][i] = y[k] of layer i (jax_impl: the
    same, as stacked arrays)."""
    ys: dict[str, list] = {}
    for i, layer in enumerate(layers):
        carry, y = body(layer, carry, None if xs is None else tuple(x[i] for x in xs))
        for k, v in y.items():
            ys.setdefault(k, []).append(v)
        if not torch.compiler.is_compiling():  # a compiled decode step stays one graph
            monitor.tick("block")
    return carry, ys


# -- attention -----------------------------------------------------------------------------------------------------
class Einsum(nn.Module):
    """One einsum kernel `w` (big_vision `Einsum`); memory order given by `storage` (see `_param`)."""

    def __init__(self, *shape: int, storage: tuple[int, ...] | None = None):
        super().__init__()
        self.w = _param(*shape, storage=storage)


class Attention(nn.Module):
    """Gemma / Gemma 2 self-attention. Parameters (canonical, per layer):
    q_einsum.w [N, D, H] + kv_einsum.w [2, K, D, H], or qkv_einsum.w [3, N, D, H] when K == N;
    attn_vec_einsum.w [N, H, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.fused_qkv:
            self.qkv_einsum = Einsum(3, n, d, h, storage=(2, 0, 1, 3))  # stored [D, 3, N, H]
        else:
            self.q_einsum = Einsum(n, d, h, storage=(1, 0, 2))  # stored [D, N, H]
            self.kv_einsum = Einsum(2, k, d, h, storage=(2, 0, 1, 3))  # stored [D, 2, K, H]
        self.attn_vec_einsum = Einsum(n, h, d)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: float[B, T, D] -> q float[B, T, N, H], k, v float[B, T, K, H]."""
        c = self.cfg
        b, t, d = x.shape
        if c.fused_qkv:
            w = self.qkv_einsum.w.permute(2, 0, 1, 3).reshape(d, -1)  # free view of [D, 3, N, H]
            qkv = (x @ w).view(b, t, 3, c.num_heads, c.head_dim)  # "BTD,SNDH->BTSNH" (S = 3)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        wq = self.q_einsum.w.permute(1, 0, 2).reshape(d, -1)
        q = (x @ wq).view(b, t, c.num_heads, c.head_dim)  # "BTD,NDH->BTNH"
        wkv = self.kv_einsum.w.permute(2, 0, 1, 3).reshape(d, -1)
        kv = (x @ wkv).view(b, t, 2, c.num_kv_heads, c.head_dim)  # "BTD,CKDH->BTCKH" (C = 2)
        return q, kv[:, :, 0], kv[:, :, 1]

    def forward(
        self,
        x: torch.Tensor,
        angles: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        *,
        attn_softcap: bool,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        write_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int] | None]:
        """x: float[B, T, D]; angles: rope_angles of the positions [B, T] (with origin); mask: bool[B, T, S].

        Without a cache S = T. With `cache` = (k, v float[L, B, S_cache, K, H] of the whole stack, this layer's
        index) the new k, v are written in place at slots `write_index` (int64[T], shared by the batch) of this
        layer, and the query attends to this layer's whole cache. Returns (float[B, T, D], the cache)."""
        c = self.cfg
        q, k, v = self.project(x)
        q = apply_rope(q, angles) * c.query_scale_value
        k = apply_rope(k, angles)
        if cache is not None:
            k_all, v_all, layer = cache
            k_all[layer].index_copy_(1, write_index, k.to(k_all.dtype))  # only the new slots are written
            v_all[layer].index_copy_(1, write_index, v.to(v_all.dtype))
            k, v = k_all[layer], v_all[layer]
        o = attend(q, k, v, mask, c.attn_softcap if attn_softcap else None)
        b, t = x.shape[:2]
        return o.reshape(b, t, -1) @ self.attn_vec_einsum.w.reshape(-1, c.width), cache  # "BTNH,NHD->BTD"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, cap: float | None) -> torch.Tensor:
    """q float[B, T, N, H] (already scaled), k/v float[B, S, K, H], mask bool[B, T, S] -> float[B, T, N, H].

    Order of every reference: scale -> softcap -> mask -> float32 softmax -> probabilities in the value dtype."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.view(b, t, kh, n // kh, h)
    s = torch.einsum("BTKGH,BSKH->BKGTS", qg, k)
    if cap is not None:
        s = softcap(s, cap)
    s = s.masked_fill(~mask[:, None, None], torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype)
    o = torch.einsum("BKGTS,BSKH->BTKGH", p, v)
    return o.reshape(b, t, n, h)
