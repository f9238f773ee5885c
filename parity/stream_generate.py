"""Block-streamed generation (issue 24 §1): prefill streamed unit by unit, then every decode step streams the weights
again, with the KV cache held resident (the estimate counts it: parity.estimate, `kv cache`).

The prompt runs as the streamed forward does (parity.stream: patch embedding, ViT blocks, encoder norm, projector,
the embedding rows of the tokens present) up to the LLM's input; then each Gemma block writes its k, v of the
prompt into its layer of the cache, the final norm, and the tied head in row chunks of the embedding table on each
row's last real token. Each decode step embeds the fed token (its rows read from the table), runs every Gemma block
on it against the cache, the final norm and the head in chunks again, and picks the next token with the
implementation's own `sample` (the resident decode's generator / keys), so a streamed generation equals the resident
one of the same dtype. The cost: every decode step re-reads every Gemma block and the whole embedding table, about
the checkpoint's size less the vision tower, per token.

The loop itself (EOS, forced tokens, the step logits) is the resident `generate`'s, written here once over the
implementations' hooks (`decoding`, `advance`, `cached_block`, `embed`, `head`, `sampler`, `caches` in
torch_impl/stream.py and jax_impl/stream.py, mirrored).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parity import monitor
from parity import points as pts
from parity.inputs import validate_inputs
from parity.stream import LLM, UNIT_KEYS, StreamModel, pipelined

DECODE_PATH = "streamed: prefill and each decode step run unit by unit, the weights read again every step"


def check_forced(forced_tokens, batch: int, steps: int) -> np.ndarray:
    """forced_tokens as int[B, steps] (ValueError naming expected and found shapes otherwise), as the api's."""
    forced = np.asarray(forced_tokens)
    if forced.shape != (batch, steps) or not np.issubdtype(forced.dtype, np.integer):
        raise ValueError(f"forced_tokens: expected int[{batch}, {steps}], found {forced.dtype}{list(forced.shape)}")
    return forced


def _pass(m: StreamModel, state, x: np.ndarray, text: np.ndarray, decode: bool, first=None) -> np.ndarray:
    """Every Gemma block on x against the cache, the final norm, then the head in row chunks on each row's last
    real token (prompt) or its one token (decode step): logits float[B, V]. `first`: (read, run) of a unit to run
    before the blocks (a decode step's embedding), its output x."""
    h, src, cfg = m.hook, m.source, m.config
    box = {"x": x}

    def block(w, i):
        box["x"] = h.cached_block(m.model, w, i, box["x"], state)

    def norm(w):
        y = h.unit(m.model, w, pts.LLM_FINAL_NORM, box["x"], text)
        # each row's last real token, copied: a [B, 1, D] view with a zero stride would take another matmul path
        box["x"] = y if decode else y[np.arange(len(y)), state.seq_len - 1][:, None].copy()

    steps = [] if first is None else [(first[0], lambda w: box.update(x=first[1](w)), None)]
    tick = None if decode else "block"  # the prompt's blocks count as forward progress; a step's do not
    steps += [(lambda i=i: src.layer(LLM, i), lambda w, i=i: block(w, i), tick) for i in range(cfg.text.depth)]
    steps.append((lambda: src.read(UNIT_KEYS[pts.LLM_FINAL_NORM]), norm, None))
    chunks: list[np.ndarray] = []
    head = lambda w: chunks.append(h.head(m.model, w, box["x"], decode))
    steps += [(lambda a=a, b=b: src.rows(a, b), head, None) for a, b in m.spans()]
    pipelined(steps)
    return np.concatenate(chunks, axis=-1)[:, 0]


def generate(
    s,
    m: StreamModel,
    inputs: dict[str, np.ndarray],
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int = 1,
    return_logits: bool = False,
    capture: list[str] | None = None,
    compile: str | None = None,
    ignore_eos: bool = False,
    forced_tokens: np.ndarray | None = None,
) -> dict[str, Any]:
    """backend.generate of the Streamed backend `s` on its StreamModel `m` (the Backend protocol's contract; `compile`
    is accepted and unused: each unit runs as the streamed forward runs it)."""
    cfg, h, src = m.config, m.hook, m.source
    inputs = validate_inputs(inputs, cfg, "inputs")
    capture = list(capture or ())
    unknown = sorted(set(capture) - set(pts.cache_points(cfg)))
    if unknown:
        raise ValueError(f"a streamed generation captures the cache points only (a capture run the others): {unknown}")
    text = np.asarray(inputs["text"])
    b, n = text.shape[0], max_new_tokens
    p = cfg.num_image_tokens + text.shape[1]
    forced = None if forced_tokens is None else check_forced(forced_tokens, b, n)
    state = h.decoding(m.model, inputs, p + n)
    x = s.forward(m, inputs, [pts.LLM_INPUT])[pts.LLM_INPUT]  # the prompt's units up to the LLM, streamed
    logits = _pass(m, state, x, text, decode=False)
    src.ck.verify_read()  # every tensor read front to back once: its stored checksum checked (as the forward does)
    pick = h.sampler(m.model, seed, greedy, temperature, top_k, top_p)
    tokens = np.zeros((b, n), np.int32)
    done = np.zeros(b, bool)
    all_logits = []
    for t in range(n):
        if return_logits:
            all_logits.append(logits)
        nxt = np.asarray(pick(logits)).astype(np.int64)
        tokens[:, t] = nxt if ignore_eos else np.where(done, 0, nxt)
        done |= nxt == eos_id
        monitor.tick("token")
        if t == n - 1 or (not ignore_eos and bool(done.all())):
            break
        feed = nxt if forced is None else forced[:, t].astype(np.int64)
        h.advance(m.model, state, state.seq_len + t, p + t)
        ids, local = np.unique(feed, return_inverse=True)
        first = (lambda ids=ids: src.take(ids), lambda w, local=local: h.embed(m.model, w, local.reshape(b, 1)))
        logits = _pass(m, state, None, feed[:, None], decode=True, first=first)
    src.check()
    out: dict[str, Any] = {"tokens": tokens, "decode_path": DECODE_PATH}
    if return_logits:
        out["logits"] = np.stack(all_logits, axis=1)
    if capture:
        out.update({k: v for k, v in h.caches(m.model, state).items() if k in capture})
    return out
