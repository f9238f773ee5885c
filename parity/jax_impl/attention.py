"""Gemma attention pieces: RoPE, prefix-LM and sliding-window masks, softcap, grouped-query attention (JAX).

Axis letters (parity.config): B batch, T query length, S key length (the whole cache when decoding), D width,
N query heads, K kv heads, G = N / K query heads per kv head, H head dim.
Query head n reads kv head n // G (big_vision's `BTKGH` grouping, transformers' `repeat_kv`).
Mirrors parity/torch_impl/attention.py function for function; layers are stacked on a leading depth axis
(`stack`) and run with `jax.lax.scan` over the split stack (`scan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from parity.config import TextConfig


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap), in the op order of every reference."""
    return jnp.tanh(x / cap) * cap


# -- RoPE ----------------------------------------------------------------------------------------------------------
def rope_angles(positions: jax.Array, head_dim: int, base: float, dtype) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) float[B, T, 1, H] in `dtype` for int positions [B, T]. The decoder computes them once per call
    and every layer applies them (all layers rotate by the same angles).

    Angles in float32 as `p * (1 / base^(2i/H))`, cos/sin cast to the activation dtype (transformers' formula,
    as torch_impl)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, angles: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Half-split rotary embedding of x float[B, T, N, H] by `angles` = rope_angles(...) (cos, sin)."""
    cos, sin = angles
    h = x.shape[-1]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Half-split rotary embedding in one call. x: float[B, T, N, H]; positions: int[B, T]."""
    return apply_rope(x, rope_angles(positions, x.shape[-1], base, x.dtype))


def positions_from_mask(input_mask: jax.Array, origin: int) -> jax.Array:
    """RoPE positions cumsum(input_mask) - 1 + origin (0: big_vision, 1: transformers). int32[B, S]."""
    return jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1 + origin


# -- masks (bool, True = may attend) -------------------------------------------------------------------------------
def prefix_lm_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """big_vision `make_attn_mask`: bool[B, S, S]; row i sees key j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]
    and both are real tokens."""
    car = jnp.cumsum(mask_ar.astype(jnp.int32), axis=-1)
    valid = input_mask.astype(bool)
    return (car[:, None, :] <= car[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def sliding_window_mask(
    mask: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: int,
    bidirectional: jax.Array | None = None,
    rule: str = "transformers",
) -> jax.Array:
    """Local-layer rule of a reference, on positions without the origin; mask & what the rule keeps.

    "transformers" (5.x): keys with q - k < window, except pairs of the same bidirectional block (`bidirectional`),
    which stay visible. "keras_hub": a symmetric band |q - k| <= window - 1, which does not exempt the image+prefix
    block (`bidirectional` is not used).

    mask: bool[B, T, S]; q_pos: int[B, T]; k_pos: int[B, S]; bidirectional: bool[B, T, S] or None."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    if rule == "keras_hub":
        return mask & (jnp.abs(d) < window)
    if rule != "transformers":
        raise ValueError(f"unknown sliding-window rule {rule!r}")
    near = d < window
    if bidirectional is not None:
        near = near | bidirectional
    return mask & near


def same_block(mask_ar: jax.Array) -> jax.Array:
    """bool[B, S, S]: tokens i, j share a bidirectional block (equal cumsum(mask_ar))."""
    car = jnp.cumsum(mask_ar.astype(jnp.int32), axis=-1)
    return car[:, :, None] == car[:, None, :]


# -- parameters and stacks -----------------------------------------------------------------------------------------
def _param(*shape: int) -> nnx.Param:
    """A parameter of canonical `shape` (zeros; build_model loads or replaces it)."""
    return nnx.Param(jnp.zeros(shape, jnp.float32))


def stack(make: Callable[[], nnx.Module], depth: int) -> nnx.Module:
    """`depth` copies of a block as one module whose parameters carry a leading depth axis (the canonical layout)."""
    return nnx.vmap(make, axis_size=depth, out_axes=0)()


def scan(layers: nnx.Module, body: Callable, carry, xs):
    """jax.lax.scan of `body(layer, carry, x) -> (carry, y)` over a stacked module and `xs` (a tuple of arrays with a
    leading depth axis, or None), y a dict. Returns (carry, ys) with ys[k][i] = y[k] of layer i (stacked arrays).

    The stack is split into (graphdef, state) and merged per step inside the scan: one traced block, whatever the
    depth, and safe inside other loops (no module crosses a trace level)."""
    graphdef, state = nnx.split(layers)

    def step(c, inp):
        st, x = inp
        return body(nnx.merge(graphdef, st), c, x)

    return jax.lax.scan(step, carry, (state, xs))


# -- attention -----------------------------------------------------------------------------------------------------
def grouped_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x float[B, T, D] times an einsum kernel w [*G, D, H] -> float[B, T, *G, H] ("BTD,GDH->BTGH").

    Written as a batched matmul over the flattened G axes with x broadcast to each group, so every operand is used
    in its stored (canonical) layout: a plain einsum contracts the middle axis D and makes XLA transpose (copy) the
    weight on every call, every decode step included."""
    *groups, d, h = w.shape
    b, t, _ = x.shape
    g = math.prod(groups)
    xg = jnp.broadcast_to(x.reshape(1, b * t, d), (g, b * t, d))
    y = jax.lax.dot_general(xg, w.reshape(g, d, h), (((2,), (1,)), ((0,), (0,))))  # [G, BT, H]
    return jnp.moveaxis(y, 0, 1).reshape(b, t, *groups, h)


class Einsum(nnx.Module):
    """One einsum kernel `w` (big_vision `Einsum`)."""

    def __init__(self, *shape: int):
        self.w = _param(*shape)


class Attention(nnx.Module):
    """Gemma / Gemma 2 self-attention. Parameters (canonical, per layer):
    q_einsum.w [N, D, H] + kv_einsum.w [2, K, D, H], or qkv_einsum.w [3, N, D, H] when K == N;
    attn_vec_einsum.w [N, H, D]."""

    def __init__(self, cfg: TextConfig):
        self.cfg = cfg
        d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.fused_qkv:
            self.qkv_einsum = Einsum(3, n, d, h)
        else:
            self.q_einsum = Einsum(n, d, h)
            self.kv_einsum = Einsum(2, k, d, h)
        self.attn_vec_einsum = Einsum(n, h, d)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: float[B, T, D] -> q float[B, T, N, H], k, v float[B, T, K, H]."""
        if self.cfg.fused_qkv:
            qkv = grouped_matmul(x, self.qkv_einsum.w[...])  # "BTD,SNDH->BTSNH" (S = 3)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = grouped_matmul(x, self.q_einsum.w[...])  # "BTD,NDH->BTNH"
        kv = grouped_matmul(x, self.kv_einsum.w[...])  # "BTD,CKDH->BTCKH" (C = 2)
        return q, kv[:, :, 0], kv[:, :, 1]

    def __call__(
        self,
        x: jax.Array,
        angles: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        *,
        attn_softcap: bool,
        cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        write_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array] | None]:
        """x: float[B, T, D]; angles: rope_angles of the positions [B, T] (with origin); mask: bool[B, T, S].

        Without a cache S = T. With `cache` = (k, v float[L, B, S_cache, K, H] of the whole stack, this layer's
        index) the new k, v are written at slots write_index .. write_index + T - 1 (shared by the batch) of this
        layer, and the query attends to this layer's whole cache. Returns (float[B, T, D], the cache)."""
        c = self.cfg
        q, k, v = self.project(x)
        q = apply_rope(q, angles) * jnp.asarray(c.query_scale_value, q.dtype)
        k = apply_rope(k, angles)
        if cache is not None:
            k_all, v_all, layer = cache
            at = (layer, 0, write_index, 0, 0)  # only the new slots are written: no copy of the cache
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
            cache = (k_all, v_all, layer)
        o = attend(q, k, v, mask, c.attn_softcap if attn_softcap else None)
        b, t = x.shape[:2]
        return o.reshape(b, t, -1) @ self.attn_vec_einsum.w[...].reshape(-1, c.width), cache  # "BTNH,NHD->BTD"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cap: float | None) -> jax.Array:
    """q float[B, T, N, H] (already scaled), k/v float[B, S, K, H], mask bool[B, T, S] -> float[B, T, N, H].

    Order of every reference: scale -> softcap -> mask -> float32 softmax -> probabilities in the value dtype."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k)
    if cap is not None:
        s = softcap(s, cap)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(s.dtype).min)
    p = jax.nn.softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32)), axis=-1).astype(v.dtype)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p, v)
    return o.reshape(b, t, n, h)
