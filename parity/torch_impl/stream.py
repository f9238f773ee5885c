"""The block-streamed run's hook (parity/stream.py drives it; jax_impl/stream.py mirrors it): a PaliGemma with no
weights (on the meta device), and each unit run with only its weights placed, then released back to meta.

Every function takes the unit's weights as {canonical key: numpy array} (a layer's slice for stacked keys; the
embedding: the rows of the tokens present, or a chunk of rows for the head) and runs the same module code as the
resident model's forward, so a streamed point equals the resident one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from parity import points as pts
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.errors import ConfigError
from parity.torch_impl import api
from parity.torch_impl.decoder import block_mask
from parity.torch_impl.generate import KVCache, _cache_masks, sample
from parity.torch_impl.load import to_torch, torch_names
from parity.torch_impl.model import PaliGemma


def skeleton(config: PaliGemmaConfig, conventions: Conventions, dtype: str, device: str, precision: str) -> PaliGemma:
    """A PaliGemma on the meta device (no memory), remembering where and how its units run."""
    if precision not in api.PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(api.PRECISIONS)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(api.DTYPES[dtype])
    try:
        with torch.device("meta"):
            model = PaliGemma(config, conventions)
    finally:
        torch.set_default_dtype(previous)
    model.precision, model.stream_dtype, model.stream_device = precision, api.DTYPES[dtype], api.resolve_device(device)
    return model.eval()


def manifest(model: PaliGemma) -> dict[str, Any]:
    return {}


@contextlib.contextmanager
def _placed(model: PaliGemma, weights: dict[str, np.ndarray], layer: int | None = None) -> Iterator[None]:
    """`weights` as the model's parameters (layer `layer` of stacked keys) inside the block; meta again after.
    `weights` is emptied on the way (the parameters alias the numpy arrays when the dtypes agree)."""
    names = []
    try:
        while weights:
            key, x = weights.popitem()
            *path, leaf = torch_names(key, None if layer is None else layer + 1)[-1].split(".")
            module = model.get_submodule(".".join(path))
            t = to_torch(x).to(device=model.stream_device, dtype=model.stream_dtype)
            names.append((module, leaf, getattr(module, leaf)))
            setattr(module, leaf, nn.Parameter(t, requires_grad=False))
        yield
    finally:
        for module, leaf, meta in names:
            setattr(module, leaf, meta)


def _input(model: PaliGemma, x: np.ndarray) -> torch.Tensor:
    wide = np.float64 if model.stream_dtype == torch.float64 else np.float32
    return torch.as_tensor(np.asarray(x, wide), device=model.stream_device).to(model.stream_dtype)


def _ints(model: PaliGemma, x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x).astype(np.int64), device=model.stream_device)


@torch.inference_mode()
def patch(model: PaliGemma, weights: dict[str, np.ndarray], image: np.ndarray) -> dict[str, np.ndarray]:
    """The patch embedding and the position embedding added: {IMG_PATCH_EMBED, IMG_POS_EMBED}."""
    img = torch.as_tensor(np.asarray(image, np.float32), device=model.stream_device)
    with _placed(model, weights), api.matmul_precision(model.precision):
        x = model.img.embedding(img.to(model.stream_dtype))
        y = x + model.img.pos_embedding
    return {pts.IMG_PATCH_EMBED: api._numpy(x), pts.IMG_POS_EMBED: api._numpy(y)}


@torch.inference_mode()
def vit_block(model: PaliGemma, weights: dict[str, np.ndarray], i: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """ViT block i on its input x: {img_block_attn(i), img_block_out(i)}."""
    with _placed(model, weights, i), api.matmul_precision(model.precision):
        _, aux = model.img.Transformer.encoderblock[i](_input(model, x))
    return {name(i): api._numpy(aux[k]) for k, name in pts.IMG_BLOCK_POINTS.items()}


@torch.inference_mode()
def llm_block(model: PaliGemma, weights: dict[str, np.ndarray], i: int, x: np.ndarray, inputs) -> dict[str, np.ndarray]:
    """Gemma block i on its input x, with the masks and positions of `inputs`: {attn, mlp, out} of layer i."""
    mask_ar, mask_input = _ints(model, inputs["mask_ar"]), inputs.get("mask_input")
    mask_input = torch.ones_like(mask_ar) if mask_input is None else _ints(model, mask_input)
    with _placed(model, weights, i), api.matmul_precision(model.precision):
        _, _, positions, masks = model.full_masks(mask_ar, mask_input)
        h = _input(model, x)
        mask = block_mask(masks, model.llm.local_layers()[i])
        _, aux, _ = model.llm.layers[i](h, model.llm.angles(positions, h.dtype), mask, attn_softcap=model.attn_softcap)
    return {name(i): api._numpy(aux[k]) for k, name in pts.LLM_BLOCK_POINTS.items()}


@torch.inference_mode()
def unit(model: PaliGemma, weights: dict[str, np.ndarray], point: str, x: np.ndarray, text: np.ndarray) -> np.ndarray:
    """The unit whose output is `point` (points.graph_units) on x; for LLM_INPUT the weights hold the embedding rows
    of the tokens present and `text` indexes them, for LOGITS a chunk of rows (the logits of those rows)."""
    with _placed(model, weights), api.matmul_precision(model.precision):
        return api._numpy(model.unit(point, _input(model, x), _ints(model, text)))


# -- generation (parity/stream_generate.py drives these): the KV cache held resident, every block streamed ------------
@dataclasses.dataclass
class Decoding:
    """A streamed generation's state: the cache ([L, B, S, K, H], as generate.KVCache), and the positions, masks
    and write slots of the pass about to run (the prompt's, then each decode step's)."""

    cache: KVCache
    positions: torch.Tensor
    masks: dict
    write_index: torch.Tensor
    seq_len: np.ndarray  # int[B]: real prompt tokens per row


@torch.inference_mode()
def decoding(model: PaliGemma, inputs, size: int) -> Decoding:
    """A zeroed cache of `size` slots with the prompt's slots 0..P-1 marked, and the prompt's positions and masks
    padded to the cache (generate.prefill's first lines)."""
    mask_ar, mask_input = _ints(model, inputs["mask_ar"]), inputs.get("mask_input")
    mask_input = torch.ones_like(mask_ar) if mask_input is None else _ints(model, mask_input)
    t = model.config.text
    b = mask_ar.shape[0]
    shape = (t.depth, b, size, t.num_kv_heads, t.head_dim)
    zeros = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=model.stream_device)
    kv, slots = (zeros(shape, model.stream_dtype) for _ in "kv"), shape[1:3]
    cache = KVCache(*kv, zeros(slots, torch.bool), zeros(slots, torch.long))
    input_mask, _, positions, masks = model.full_masks(mask_ar, mask_input)
    p = input_mask.shape[1]
    cache.valid[:, :p] = input_mask.bool()
    cache.pos[:, :p] = positions - model.conventions.position_origin
    pad = lambda m: None if m is None else torch.cat([m, m.new_zeros(b, p, size - p)], dim=2)
    masks = {name: pad(m) for name, m in masks.items()}
    seq_len = input_mask.long().sum(-1).cpu().numpy()
    return Decoding(cache, positions, masks, torch.arange(p, device=model.stream_device), seq_len)


@torch.inference_mode()
def advance(model: PaliGemma, state: Decoding, rel: np.ndarray, write_index: int) -> None:
    """Make `state` the decode step writing slot `write_index` with one token per row at positions `rel` int[B]
    (no origin): generate.decode_step's first lines."""
    cache, rel_t = state.cache, _ints(model, np.asarray(rel)[:, None])
    state.write_index = torch.tensor([write_index], device=model.stream_device)
    cache.valid.index_fill_(1, state.write_index, True)
    cache.pos.index_copy_(1, state.write_index, rel_t)
    state.masks = _cache_masks(model, cache.valid[:, None, :], rel_t, cache.pos, None)
    state.positions = rel_t + model.conventions.position_origin


@torch.inference_mode()
def cached_block(
    model: PaliGemma, weights: dict[str, np.ndarray], i: int, x: np.ndarray, state: Decoding
) -> np.ndarray:
    """Gemma block i on x (the prompt, or one token per row) against the cache, its k, v written at the state's
    slots: the block's output."""
    with _placed(model, weights, i), api.matmul_precision(model.precision):
        h = _input(model, x)
        mask = block_mask(state.masks, model.llm.local_layers()[i])
        cache = (state.cache.k, state.cache.v, i)
        h, _, _ = model.llm.layers[i](
            h,
            model.llm.angles(state.positions, h.dtype),
            mask,
            attn_softcap=model.attn_softcap,
            cache=cache,
            write_index=state.write_index,
        )
    return api._numpy(h)


@torch.inference_mode()
def embed(model: PaliGemma, weights: dict[str, np.ndarray], local: np.ndarray) -> np.ndarray:
    """The text embedding (scaled by sqrt(D)) of tokens `local` int[B, T], indexes into the rows `weights` holds."""
    with _placed(model, weights):
        return api._numpy(model.embed_text(_ints(model, local)))


@torch.inference_mode()
def head(model: PaliGemma, weights: dict[str, np.ndarray], x: np.ndarray, decode: bool) -> np.ndarray:
    """The logits of a chunk of the embedding table's rows on final-normed x, capped as generation caps them: the
    prompt's last token as the forward does ("always"), a decode step's unless "never"."""
    rule = model.conventions.final_softcap
    with _placed(model, weights), api.matmul_precision(model.precision):
        return api._numpy(model.llm.logits(_input(model, x), capped=rule != "never" if decode else rule == "always"))


def sampler(model: PaliGemma, seed: int, greedy: bool, temperature: float, top_k, top_p) -> Callable:
    """logits float[B, V] (numpy) -> int[B]: generate.sample with the generator the resident decode seeds."""
    gen = torch.Generator(device=model.stream_device).manual_seed(seed)

    def pick(logits: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(logits, device=model.stream_device)
        return sample(t, greedy, temperature, top_k, top_p, gen).cpu().numpy()

    return pick


def caches(model: PaliGemma, state: Decoding) -> dict[str, np.ndarray]:
    """The cache points llm/layerNN/{k,v}_cache float32[B, S, K, H] (float64 for a float64 model)."""
    out = {}
    for i in range(model.config.text.depth):
        out[pts.llm_k_cache(i)], out[pts.llm_v_cache(i)] = api._numpy(state.cache.k[i]), api._numpy(state.cache.v[i])
    return out
