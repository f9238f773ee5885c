"""Generation with a preallocated KV cache: a jitted prefill, then one compiled `lax.while_loop` of decode steps.

Same slot and position scheme as torch_impl/generate.py: prompts are right-padded (mask_input 0 on padding,
big_vision style); the cache holds [image ; padded text] at slots 0..P-1 and generated tokens at the shared write
index P, P+1, ...; padded slots stay masked; each row's RoPE position continues from its own prompt length.
Axis letters: B batch, P prompt length (T image + L text), S cache length, L depth, K kv heads, H head dim,
V vocabulary rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from parity import points
from parity.jax_impl.attention import sliding_window_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: float[L, B, S, K, H] after RoPE; valid: bool[B, S] slots holding real tokens; pos: int32[B, S]
    positions (without the origin) of the slots, for the sliding window."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    pos: jax.Array


_INDEX = jax.dtypes.canonicalize_dtype(int)  # the dtype of a literal index: int64 under x64 (float64 runs), else int32


def _wide(x: jax.Array):
    """The dtype a logit or cache point leaves in: float32, or float64 for a float64 model."""
    return jnp.promote_types(x.dtype, jnp.float32)


def init_cache(model, batch: int, size: int) -> KVCache:
    """A zeroed cache of `size` slots in the model's dtype (inside the jitted prefill: allocated on its device)."""
    t = model.config.text
    dtype = model.llm.final_norm.scale[...].dtype
    shape = (t.depth, batch, size, t.num_kv_heads, t.head_dim)
    zeros = jnp.zeros
    return KVCache(zeros(shape, dtype), zeros(shape, dtype), zeros(shape[1:3], bool), zeros(shape[1:3], jnp.int32))


def _cache_masks(model, q_mask: jax.Array, q_rel: jax.Array, k_pos: jax.Array, bidirectional=None) -> dict:
    """{"global", "local"} masks of queries against the whole cache. q_mask: bool[B, T, S]; q_rel int[B, T]."""
    masks = {"global": q_mask, "local": None}
    if model.windowed:
        masks["local"] = sliding_window_mask(
            q_mask, q_rel, k_pos, model.config.text.sliding_window, bidirectional, rule=model.conventions.sliding_window
        )
    return masks


def prefill(
    model, cache: KVCache, image, text, mask_ar, mask_input, capture: Collection[str] = (), out: dict | None = None
):
    """Run the prompt through the model, filling cache slots 0..P-1.

    Returns (logits float[B, V] at each row's last real token, seq_len int32[B] = real prompt tokens, cache)."""
    out = {} if out is None else out
    x = model.embed(image, text, capture, out)
    input_mask, _, positions, masks = model.full_masks(mask_ar, mask_input)
    b, p = input_mask.shape
    size = cache.valid.shape[1]
    rel = positions - model.conventions.position_origin
    valid = cache.valid.at[:, :p].set(input_mask.astype(bool))
    pos = cache.pos.at[:, :p].set(rel)
    pad = lambda m: None if m is None else jnp.pad(m, ((0, 0), (0, 0), (0, size - p)))
    masks = {name: pad(m) for name, m in masks.items()}
    h, kv = model.llm(
        x,
        positions,
        masks,
        attn_softcap=model.attn_softcap,
        capture=capture,
        out=out,
        caches={"k": cache.k, "v": cache.v},
        write_index=0,
    )
    capped = model.conventions.final_softcap == "always"
    if points.LOGITS in capture:
        out[points.LOGITS] = model.llm.logits(h, capped=capped)
    seq_len = input_mask.sum(-1).astype(jnp.int32)  # int32 under x64 (float64 runs) too
    last = h[jnp.arange(b), seq_len - 1][:, None]
    return model.llm.logits(last, capped=capped)[:, 0], seq_len, KVCache(kv["k"], kv["v"], valid, pos)


def decode_step(model, cache: KVCache, token: jax.Array, rel: jax.Array, write_index: jax.Array):
    """One new token per row. token int32[B, 1]; rel int32[B, 1] its position (no origin); write_index int32[].
    Returns (logits float[B, V], cache)."""
    write_index = jnp.asarray(write_index).astype(_INDEX)
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones_like(token, bool), (0, write_index))
    pos = jax.lax.dynamic_update_slice(cache.pos, rel.astype(jnp.int32), (0, write_index))
    x = model.embed_text(token)
    masks = _cache_masks(model, valid[:, None, :], rel, pos, None)
    h, kv = model.llm(
        x,
        rel + model.conventions.position_origin,
        masks,
        attn_softcap=model.attn_softcap,
        capture=frozenset(),
        out={},
        caches={"k": cache.k, "v": cache.v},
        write_index=write_index,
    )
    logits = model.llm.logits(h, capped=model.conventions.final_softcap != "never")[:, 0]
    return logits, KVCache(kv["k"], kv["v"], valid, pos)


def sample(
    logits: jax.Array,
    key: jax.Array,
    greedy: bool,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """logits float[B, V] -> int32[B]; as torch_impl: temperature, then top-k, then top-p (the smallest prefix of
    mass >= top_p), then a draw by the exponential trick (argmax of p / Exp(1))."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None and top_p < 1.0:
        idx = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, idx, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        drop = (jnp.cumsum(probs, axis=-1) - probs) > top_p
        x = jnp.take_along_axis(jnp.where(drop, -jnp.inf, sorted_x), jnp.argsort(idx, axis=-1), axis=-1)
    probs = jax.nn.softmax(x, axis=-1)
    q = jax.random.exponential(key, probs.shape, jnp.float32)
    return jnp.argmax(probs / q, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The static part of a decode (one compiled loop per distinct value)."""

    max_new_tokens: int
    greedy: bool = True
    top_k: int | None = None
    top_p: float | None = None
    return_logits: bool = False


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _prefill(graphdef, state, image, text, mask_ar, mask_input, size: int, capture: tuple[str, ...]):
    out: dict = {}
    model = nnx.merge(graphdef, state)
    cache = init_cache(model, text.shape[0], size)
    logits, seq_len, cache = prefill(model, cache, image, text, mask_ar, mask_input, capture, out)
    return logits, seq_len, cache, {k: v.astype(_wide(v)) for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(
    graphdef,
    s: Sampling,
    state,
    logits,
    seq_len,
    cache: KVCache,
    key,
    temperature,
    eos_id,
    ignore_eos,
    prompt_len,
    forced=None,
):
    """The whole decode as one while_loop: step t feeds token t-1 at slot prompt_len + t - 1 (stops when every row
    has emitted eos_id, unless ignore_eos; eos_id, ignore_eos and temperature are traced: no recompilation).
    Returns (tokens int32[B, N], logits float32[B, N, V] or None, cache)."""
    b, n = logits.shape[0], s.max_new_tokens

    def pick(logits, key, done):
        nxt = sample(logits, key, s.greedy, temperature, s.top_k, s.top_p)
        return nxt, jnp.where(done & ~ignore_eos, 0, nxt), done | (nxt == eos_id)

    key, sub = jax.random.split(key)
    nxt, first, done = pick(logits, sub, jnp.zeros(b, bool))
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first)
    all_logits = (
        jnp.zeros((b, n, logits.shape[-1]), _wide(logits)).at[:, 0].set(logits.astype(_wide(logits)))
        if s.return_logits
        else None
    )

    def cond(c):
        t, _, _, done, _, _, _ = c
        return (t < n) & (ignore_eos | ~jnp.all(done))

    def body(c):
        t, nxt, tokens, done, cache, key, all_logits = c
        model = nnx.merge(graphdef, state)  # merged inside the loop body: no module crosses a trace level
        feed = nxt if forced is None else jax.lax.dynamic_index_in_dim(forced, t - 1, axis=1, keepdims=False)
        logits, cache = decode_step(model, cache, feed[:, None], (seq_len + t - 1)[:, None], prompt_len + t - 1)
        key, sub = jax.random.split(key)
        nxt, tok, done = pick(logits, sub, done)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
        if all_logits is not None:
            all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None].astype(all_logits.dtype), (0, t, 0))
        return t + 1, nxt, tokens, done, cache, key, all_logits

    steps, _, tokens, _, cache, _, all_logits = jax.lax.while_loop(
        cond, body, (jnp.asarray(1, _INDEX), nxt, tokens, done, cache, key, all_logits)
    )
    return tokens, all_logits, steps, cache


@dataclasses.dataclass
class Generation:
    tokens: jax.Array  # int32[B, max_new], 0 after EOS unless ignore_eos
    logits: jax.Array | None  # float32[B, steps, V] when asked
    captured: dict[str, jax.Array]
    decode_path: str


def generate(
    model,
    image,
    text,
    mask_ar,
    mask_input=None,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int = 1,
    return_logits: bool = False,
    capture: Collection[str] = (),
    ignore_eos: bool = False,
    forced_tokens: jax.Array | None = None,
) -> Generation:
    """Prefill, then decode until every row emitted `eos_id` (unless ignore_eos) or `max_new_tokens` were
    generated. Both stages are compiled once per shape and Sampling.
    forced_tokens int32[B, max_new_tokens]: step t+1 is fed forced_tokens[:, t] instead of the token picked at step
    t (teacher forcing through the same decode loop); `tokens` still holds the model's own picks."""
    capture = frozenset(capture)
    if mask_input is None:
        mask_input = jnp.ones_like(text)
    p = model.config.num_image_tokens + text.shape[1]
    graphdef, state = nnx.split(model)
    forward = tuple(sorted(capture & set(points.forward_points(model.config))))
    logits, seq_len, cache, out = _prefill(
        graphdef, state, image, text, mask_ar, mask_input, p + max_new_tokens, forward
    )
    s = Sampling(max_new_tokens, greedy, top_k, top_p, return_logits)
    tokens, all_logits, steps, cache = _decode(
        graphdef,
        s,
        state,
        logits,
        seq_len,
        cache,
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.int32(eos_id),
        jnp.bool_(ignore_eos),
        jnp.int32(p),
        None if forced_tokens is None else jnp.asarray(forced_tokens, jnp.int32),
    )
    for i in range(model.config.text.depth):
        for name, buf in ((points.llm_k_cache(i), cache.k), (points.llm_v_cache(i), cache.v)):
            if name in capture:
                out[name] = buf[i].astype(_wide(buf))
    if all_logits is not None:
        all_logits = all_logits[:, : int(steps)]  # the steps that ran, as torch_impl
    return Generation(tokens, all_logits, out, "compiled:jit prefill + lax.while_loop decode")
