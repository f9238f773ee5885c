"""Generation with a static KV cache, gpt-fast style: allocate, prefill the prompt, then a one-token decode loop.

Prompts are right-padded (mask_input 0 on padding, big_vision style). The cache holds [image ; padded text] at slots
0..P-1 and generated tokens at the shared write index P, P+1, ...; padded slots stay masked. Each row's RoPE
position continues from its own prompt length. Axis letters: B batch, P prompt length (T image + L text),
S cache length, L depth, K kv heads, H head dim, V vocabulary rows.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Collection

import torch

from parity import monitor, points
from parity.torch_impl.attention import sliding_window_mask

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KVCache:
    """k, v: float[L, B, S, K, H] after RoPE; valid: bool[B, S] slots holding real tokens; pos: int64[B, S]
    positions (without the origin) of the slots, for the sliding window. Passed explicitly and written in place
    (static shapes and addresses: one compiled decode step, CUDA graphs replay on the same memory)."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor


# The last cache of each model, reused when the shape matches: a compiled decode step (CUDA graphs) keeps its
# recorded addresses across generate calls.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def init_cache(model, batch: int, size: int) -> KVCache:
    """A zeroed cache of `size` slots in the model's dtype and device (the last one's memory when it fits)."""
    t = model.config.text
    p = model.llm.final_norm.scale
    shape = (t.depth, batch, size, t.num_kv_heads, t.head_dim)
    cache = _CACHES.get(model)
    if cache is None or cache.k.shape != shape or cache.k.dtype != p.dtype or cache.k.device != p.device:
        zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=p.device)
        cache = KVCache(
            zeros(shape, p.dtype), zeros(shape, p.dtype), zeros(shape[1:3], torch.bool), zeros(shape[1:3], torch.long)
        )
        if p.device.type == "cuda":  # compiled steps take the buffers as static inputs, not copies
            for buf in (cache.k, cache.v, cache.valid, cache.pos):
                torch._dynamo.mark_static_address(buf)
        _CACHES[model] = cache
    for buf in (cache.k, cache.v, cache.valid, cache.pos):
        buf.zero_()
    return cache


def _cache_masks(model, q_mask: torch.Tensor, q_rel: torch.Tensor, k_pos: torch.Tensor, bidirectional=None) -> dict:
    """{"global", "local"} masks of queries against the whole cache. q_mask: bool[B, T, S]; q_rel int[B, T]."""
    masks = {"global": q_mask, "local": None}
    if model.windowed:
        masks["local"] = sliding_window_mask(
            q_mask, q_rel, k_pos, model.config.text.sliding_window, bidirectional, rule=model.conventions.sliding_window
        )
    return masks


@torch.no_grad()
def prefill(
    model, cache: KVCache, image, text, mask_ar, mask_input, capture: Collection[str] = (), out: dict | None = None
):
    """Run the prompt through the model, filling cache slots 0..P-1.

    Returns (logits float[B, V] at each row's last real token, seq_len int64[B] = real prompt tokens, cache)."""
    out = {} if out is None else out
    x = model.embed(image, text, capture, out)
    input_mask, _, positions, masks = model.full_masks(mask_ar, mask_input)
    b, p = input_mask.shape
    size = cache.valid.shape[1]
    rel = positions - model.conventions.position_origin
    cache.valid[:, :p] = input_mask.bool()
    cache.pos[:, :p] = rel
    pad = lambda m: None if m is None else torch.cat([m, m.new_zeros(b, p, size - p)], dim=2)
    masks = {name: pad(m) for name, m in masks.items()}
    h, _ = model.llm(
        x,
        positions,
        masks,
        attn_softcap=model.attn_softcap,
        capture=capture,
        out=out,
        caches={"k": cache.k, "v": cache.v},
        write_index=torch.arange(p, device=x.device),
    )
    capped = model.conventions.final_softcap == "always"
    if points.LOGITS in capture:
        out[points.LOGITS] = model.llm.logits(h, capped=capped)
    seq_len = input_mask.long().sum(-1)
    last = h[torch.arange(b, device=h.device), seq_len - 1][:, None]
    return model.llm.logits(last, capped=capped)[:, 0], seq_len, cache  # written in place


def decode_step(model, cache: KVCache, token: torch.Tensor, rel: torch.Tensor, write_index: torch.Tensor):
    """One new token per row. token int64[B, 1]; rel int64[B, 1] its position (no origin); write_index int64[1].
    Returns (logits float[B, V], cache). Pure tensor code on static buffers (the cache is written in place): safe for
    torch.compile / CUDA graphs."""
    cache.valid.index_fill_(1, write_index, True)
    cache.pos.index_copy_(1, write_index, rel)
    x = model.embed_text(token)
    masks = _cache_masks(model, cache.valid[:, None, :], rel, cache.pos, None)
    h, _ = model.llm(
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
    return logits, cache  # written in place


def sample(
    logits: torch.Tensor,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits float[B, V] -> int64[B]. Sampling draws with the exponential trick (no host sync)."""
    if greedy:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > top_p  # keeps the smallest prefix with mass >= top_p
        x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


_COMPILED: dict[str, Callable] = {}


def compiled_decode_step(mode: str = "reduce-overhead") -> Callable:
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(decode_step, mode=mode, fullgraph=True)
    return _COMPILED[mode]


@dataclasses.dataclass
class Generation:
    tokens: torch.Tensor  # int64[B, max_new], 0 after EOS unless ignore_eos
    logits: torch.Tensor | None  # float[B, steps, V] when asked
    captured: dict[str, torch.Tensor]
    decode_path: str  # "eager" or "compiled:<mode>"


@torch.no_grad()
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
    compile: str | None = None,
    ignore_eos: bool = False,
    forced_tokens: torch.Tensor | None = None,
) -> Generation:
    """Prefill, then decode until every row emitted `eos_id` or `max_new_tokens` were generated. ignore_eos: every
    row decodes exactly `max_new_tokens` steps and keeps its tokens after `eos_id` (big_vision's decode,
    transformers with eos_token_id=None).
    forced_tokens int64[B, max_new_tokens]: step t+1 is fed forced_tokens[:, t] instead of the token picked at step
    t (teacher forcing through the same cached decode path); `tokens` still holds the model's own picks.

    compile: None (eager) or a torch.compile mode for the decode step ("reduce-overhead" = CUDA graphs on CUDA);
    a compile failure falls back to eager, reported in `decode_path`."""
    capture = frozenset(capture)
    if mask_input is None:
        mask_input = torch.ones_like(text)
    b, p = text.shape[0], model.config.num_image_tokens + text.shape[1]
    out: dict[str, torch.Tensor] = {}
    cache = init_cache(model, b, p + max_new_tokens)
    logits, seq_len, cache = prefill(model, cache, image, text, mask_ar, mask_input, capture, out)
    device = logits.device
    gen = torch.Generator(device=device).manual_seed(seed)
    step, path = decode_step, "eager"
    if compile:
        step, path = compiled_decode_step(compile), f"compiled:{compile}"
    tokens = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    all_logits = []
    for t in range(max_new_tokens):
        if return_logits:
            all_logits.append(logits.to(torch.promote_types(logits.dtype, torch.float32)).clone())  # f64 stays
        nxt = sample(logits, greedy, temperature, top_k, top_p, gen)
        tokens[:, t] = nxt if ignore_eos else torch.where(done, 0, nxt)
        done |= nxt == eos_id
        monitor.tick("token")
        if t == max_new_tokens - 1 or (not ignore_eos and bool(done.all())):
            break
        feed = nxt if forced_tokens is None else forced_tokens[:, t]
        args = (model, cache, feed[:, None], (seq_len + t)[:, None], torch.tensor([p + t], device=device))
        try:
            logits, cache = step(*args)
        except Exception as e:
            if step is decode_step:
                raise
            log.warning("compiled decode step failed (%s: %s); falling back to eager", type(e).__name__, e)
            step, path = decode_step, f"eager (compile {compile} failed: {type(e).__name__})"
            logits, cache = step(*args)
        if step is not decode_step:
            logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
    for i in range(model.config.text.depth):
        for name, buf in ((points.llm_k_cache(i), cache.k), (points.llm_v_cache(i), cache.v)):
            if name in capture:
                out[name] = buf[i].clone()
    stacked = torch.stack(all_logits, dim=1) if return_logits else None
    return Generation(tokens, stacked, out, path)
