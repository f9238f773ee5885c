"""Generation with a static KV cache, gpt-fast style: allocate, prefill the prompt, then a one-token decode loop.

Prompts are right-padded (mask_input 0 on padding, big_vision style). The cache holds [image ; padded text] at slots
0..P-1 and generated tokens at the shared write index P, P+1, ...; padded slots stay masked. Each row's RoPE
position continues from its own prompt length. Axis letters: B batch, P prompt length (T image + L text),
S cache length, K kv heads, H head dim, V vocabulary rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection

import torch
from torch import nn

from parity import monitor, points
from parity.torch_impl.attention import sliding_window_mask

log = logging.getLogger(__name__)


class KVCache(nn.Module):
    """Static cache, as (non-persistent) buffers so CUDA graphs see fixed addresses.
    k{i}, v{i}: float[B, S, K, H] after RoPE; valid: bool[B, S] slots holding real tokens; pos: int64[B, S]
    positions (without the origin) of the slots, for the sliding window."""

    def __init__(self, depth: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        self.depth, self.size = depth, size
        for i in range(depth):
            self.register_buffer(
                f"k{i}", torch.zeros(batch, size, kv_heads, head_dim, dtype=dtype, device=device), persistent=False
            )
            self.register_buffer(
                f"v{i}", torch.zeros(batch, size, kv_heads, head_dim, dtype=dtype, device=device), persistent=False
            )
        self.register_buffer("valid", torch.zeros(batch, size, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros(batch, size, dtype=torch.long, device=device), persistent=False)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(self.depth)]


def setup_cache(model, batch: int, size: int) -> KVCache:
    """Allocate (or reuse, when the shape matches) `model.kv`, zeroed."""
    t = model.config.text
    p = model.llm.final_norm.scale
    kv = getattr(model, "kv", None)
    if not (
        isinstance(kv, KVCache)
        and kv.valid.shape == (batch, size)
        and kv.k0.dtype == p.dtype
        and kv.k0.device == p.device
    ):
        model.kv = KVCache(t.depth, batch, size, t.num_kv_heads, t.head_dim, p.dtype, p.device)
    for b in model.kv.buffers():
        b.zero_()
    return model.kv


def _cache_masks(model, q_mask: torch.Tensor, q_rel: torch.Tensor, bidirectional: torch.Tensor | None) -> dict:
    """{"global", "local"} masks of queries against the whole cache. q_mask: bool[B, T, S]; q_rel int[B, T]."""
    masks = {"global": q_mask, "local": None}
    if model.windowed:
        masks["local"] = sliding_window_mask(
            q_mask,
            q_rel,
            model.kv.pos,
            model.config.text.sliding_window,
            bidirectional,
            rule=model.conventions.sliding_window,
        )
    return masks


@torch.no_grad()
def prefill(model, image, text, mask_ar, mask_input, capture: Collection[str] = (), out: dict | None = None):
    """Run the prompt through the model, filling cache slots 0..P-1.

    Returns (logits float[B, V] at each row's last real token, seq_len int64[B] = real prompt tokens)."""
    out = {} if out is None else out
    kv = model.kv
    x = model.embed(image, text, capture, out)
    input_mask, mask_ar_full, positions, masks = model.full_masks(mask_ar, mask_input)
    b, p = input_mask.shape
    rel = positions - model.conventions.position_origin
    kv.valid[:, :p] = input_mask.bool()
    kv.pos[:, :p] = rel
    pad = lambda m: None if m is None else torch.cat([m, m.new_zeros(b, p, kv.size - p)], dim=2)
    masks = {name: pad(m) for name, m in masks.items()}
    h = model.llm(
        x,
        positions,
        masks,
        attn_softcap=model.attn_softcap,
        capture=capture,
        out=out,
        caches=kv.layers(),
        write_index=torch.arange(p, device=x.device),
    )
    if points.LOGITS in capture:
        out[points.LOGITS] = model.llm.logits(h, capped=model.conventions.final_softcap == "always")
    seq_len = input_mask.long().sum(-1)
    last = h[torch.arange(b, device=h.device), seq_len - 1][:, None]
    return model.llm.logits(last, capped=model.conventions.final_softcap == "always")[:, 0], seq_len


def decode_step(model, token: torch.Tensor, rel: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """One new token per row. token int64[B, 1]; rel int64[B, 1] its position (no origin); write_index int64[1].
    Returns logits float[B, V]. Pure tensor code on static buffers: safe for torch.compile / CUDA graphs."""
    kv = model.kv
    kv.valid.index_fill_(1, write_index, True)
    kv.pos.index_copy_(1, write_index, rel)
    x = model.embed_text(token)
    masks = _cache_masks(model, kv.valid[:, None, :], rel, None)
    h = model.llm(
        x,
        rel + model.conventions.position_origin,
        masks,
        attn_softcap=model.attn_softcap,
        capture=frozenset(),
        out={},
        caches=kv.layers(),
        write_index=write_index,
    )
    return model.llm.logits(h, capped=model.conventions.final_softcap != "never")[:, 0]


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
    kv = setup_cache(model, b, p + max_new_tokens)
    out: dict[str, torch.Tensor] = {}
    logits, seq_len = prefill(model, image, text, mask_ar, mask_input, capture, out)
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
            all_logits.append(logits.float().clone())
        nxt = sample(logits, greedy, temperature, top_k, top_p, gen)
        tokens[:, t] = nxt if ignore_eos else torch.where(done, 0, nxt)
        done |= nxt == eos_id
        monitor.tick("token")
        if t == max_new_tokens - 1 or (not ignore_eos and bool(done.all())):
            break
        feed = nxt if forced_tokens is None else forced_tokens[:, t]
        args = (model, feed[:, None], (seq_len + t)[:, None], torch.tensor([p + t], device=device))
        try:
            logits = step(*args)
        except Exception as e:
            if step is decode_step:
                raise
            log.warning("compiled decode step failed (%s: %s); falling back to eager", type(e).__name__, e)
            step, path = decode_step, f"eager (compile {compile} failed: {type(e).__name__})"
            logits = step(*args)
        if step is not decode_step:
            logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
    for i in range(model.config.text.depth):
        for name, buf in ((points.llm_k_cache(i), kv.layers()[i][0]), (points.llm_v_cache(i), kv.layers()[i][1])):
            if name in capture:
                out[name] = buf.clone()
    stacked = torch.stack(all_logits, dim=1) if return_logits else None
    return Generation(tokens, stacked, out, path)
