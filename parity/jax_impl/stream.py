"""The block-streamed run's hook (parity/stream.py drives it; torch_impl/stream.py mirrors it): a PaliGemma with no
weights (abstract, `nnx.eval_shape`), and each unit run on a state holding only its weights (stacked keys: the
one layer, as a stack of depth 1; every other leaf an empty placeholder), compiled once per unit kind.

Every function takes the unit's weights as {canonical key: numpy array} (a layer's slice for stacked keys; the
embedding: the rows of the tokens present, or a chunk of rows for the head) and runs the same module code as the
resident model's forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parity import points as pts
from parity import spec
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.errors import ConfigError
from parity.jax_impl import api
from parity.jax_impl.decoder import block_mask
from parity.jax_impl.generate import _INDEX, _cache_masks, sample
from parity.jax_impl.load import NP_DTYPES, place, to_device
from parity.jax_impl.model import PaliGemma
from parity.stream import aligned


def skeleton(config: PaliGemmaConfig, conventions: Conventions, dtype: str, device: str, precision: str) -> api.Model:
    """An abstract PaliGemma (no memory), remembering where and how its units run."""
    if precision not in api.PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(api.PRECISIONS)}")
    if why := api.x64_refusal(dtype):
        raise ConfigError(why)
    device = api.resolve_device(device)
    model = api.Model(nnx.eval_shape(lambda: PaliGemma(config, conventions)), dtype, device, precision)
    where = api._jax_device(device)
    model.stream_where = where
    model.stream_stacked = {e.key for e in spec.entries(config) if e.layers is not None}
    model.stream_empty = {e.key: jnp.zeros((0,), api.DTYPES[dtype], device=where) for e in spec.entries(config)}
    return model


def manifest(model: api.Model) -> dict[str, Any]:
    return api.manifest(model)


@contextlib.contextmanager
def _placed(model: api.Model, weights: dict[str, np.ndarray]) -> Iterator[list]:
    """[graphdef, state] of the model holding `weights` (stacked keys as a stack of one layer) and nothing else,
    inside the block (a list, emptied when it ends, so the caller keeps no reference to the state); the unit's
    memory is released when the block ends, not when Python's cyclic collector next runs. `weights` is emptied on
    the way; each host array is aliased, not copied, by its device array (parity.stream.aligned: the reader casts
    into aligned arrays, so nothing is copied here, except from a checkpoint stored in the compute dtype: one tensor
    at a time, each freed as its copy is made).

    Releasing: flax's traversals (nnx.split, replace_by_pure_dict) leave a reference cycle (a recursive closure and
    the list of (path, Variable) it built) holding the unit's Variables, so its arrays outlived it until a collection
    (up to two earlier head chunks, 0.6 GB at 3B, were alive while the next one ran). Each device array is deleted
    (a buffer the device owns is freed at once), then the young generations are collected (~ms), which frees the
    aliased host arrays; a full collection follows if one of them is still alive. That happens after the first unit
    of each kind only (compiling it runs collections while its Variables are in use, which moves them to the oldest
    generation): 7 full collections in a run, ~0.3 s each on the loaded 2-core machine."""
    arrays, hosts, unit = {}, [], []
    try:
        while weights:
            key, x = weights.popitem()
            x = aligned(x, NP_DTYPES[model.dtype])
            hosts.append(_owner(x))
            arrays[key] = to_device(x[None] if key in model.stream_stacked else x, model.dtype, model.stream_where)
            del x
        unit.extend(nnx.split(place(model.module, {**model.stream_empty, **arrays})))
        yield unit
    finally:
        unit.clear()
        for a in arrays.values():
            a.delete()
        arrays.clear()
        gc.collect(1)
        if any(h is not None and h() is not None for h in hosts):
            gc.collect()


def _owner(x: np.ndarray) -> weakref.ref | None:
    """A weak reference to the object owning x's memory (whichever view of it a device array holds), or None when
    that object takes none (bytes)."""
    try:
        return weakref.ref(x if x.base is None else x.base)
    except TypeError:
        return None


def _input(model: api.Model, x: np.ndarray) -> jax.Array:
    return model.put(np.asarray(x, np.float64 if model.dtype == "float64" else np.float32))


def _ints(model: api.Model, x: np.ndarray) -> jax.Array:
    return model.put(np.asarray(x).astype(np.int32))


@functools.partial(jax.jit, static_argnums=(0,))
def _patch(graphdef, state, image):
    model = nnx.merge(graphdef, state)
    x = model.img.embedding(image.astype(model.img.pos_embedding[...].dtype))
    return {pts.IMG_PATCH_EMBED: api._out(x), pts.IMG_POS_EMBED: api._out(x + model.img.pos_embedding[...])}


def patch(model: api.Model, weights: dict[str, np.ndarray], image: np.ndarray) -> dict[str, np.ndarray]:
    """The patch embedding and the position embedding added: {IMG_PATCH_EMBED, IMG_POS_EMBED}."""
    with _placed(model, weights) as unit, api.matmul_precision(model.precision):
        return api._numpy(_patch(*unit, model.put(np.asarray(image, np.float32))))


def vit_block(model: api.Model, weights: dict[str, np.ndarray], i: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """ViT block i on its input x: {img_block_attn(i), img_block_out(i)}."""
    with _placed(model, weights) as unit, api.matmul_precision(model.precision):
        out = api._numpy(api._vit_block(*unit, jnp.int32(0), _input(model, x)))
    return {name(i): out[k] for k, name in pts.IMG_BLOCK_POINTS.items()}


@functools.partial(jax.jit, static_argnums=(0,))
def _llm_block(graphdef, state, local, x, mask_ar, mask_input):
    model = nnx.merge(graphdef, state)
    _, _, positions, masks = model.full_masks(mask_ar, mask_input)
    x = x.astype(model.llm.final_norm.scale[...].dtype)
    _, aux, _ = api._layer(model.llm.layers, 0)(
        x, model.llm.angles(positions, x.dtype), block_mask(masks, local), attn_softcap=model.attn_softcap
    )
    return {k: api._out(v) for k, v in aux.items()}


def llm_block(model: api.Model, weights: dict[str, np.ndarray], i: int, x: np.ndarray, inputs) -> dict[str, np.ndarray]:
    """Gemma block i on its input x, with the masks and positions of `inputs`: {attn, mlp, out} of layer i."""
    mask_ar = _ints(model, inputs["mask_ar"])
    mask_input = inputs.get("mask_input")
    mask_input = _ints(model, np.ones_like(inputs["mask_ar"]) if mask_input is None else mask_input)
    local = jnp.asarray(model.config.text.is_local_layer(i))
    with _placed(model, weights) as unit, api.matmul_precision(model.precision):
        out = api._numpy(_llm_block(*unit, local, _input(model, x), mask_ar, mask_input))
    return {name(i): out[k] for k, name in pts.LLM_BLOCK_POINTS.items()}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _unit(graphdef, state, point: str, x, text):
    model = nnx.merge(graphdef, state)
    return api._out(model.unit(point, x.astype(model.llm.final_norm.scale[...].dtype), text))


def unit(model: api.Model, weights: dict[str, np.ndarray], point: str, x: np.ndarray, text: np.ndarray) -> np.ndarray:
    """The unit whose output is `point` (points.graph_units) on x; for LLM_INPUT the weights hold the embedding rows
    of the tokens present and `text` indexes them, for LOGITS a chunk of rows (the logits of those rows)."""
    with _placed(model, weights) as unit, api.matmul_precision(model.precision):
        return np.asarray(jax.device_get(_unit(*unit, point, _input(model, x), _ints(model, text))))


# -- generation (parity/stream_generate.py drives these): the KV cache held resident, every block streamed ------------
@dataclasses.dataclass
class Decoding:
    """A streamed generation's state: the cache (each layer's k, v [1, B, S, K, H], a stack of one layer as its
    block sees it; the slots' valid and pos as generate.KVCache's), and the positions, masks and write slot of the
    pass about to run (the prompt's, then each decode step's)."""

    k: list[jax.Array]
    v: list[jax.Array]
    valid: np.ndarray  # bool[B, S]
    pos: np.ndarray  # int32[B, S]
    angles: tuple[jax.Array, jax.Array]  # RoPE (cos, sin), computed once per pass as the resident decoder does
    masks: dict
    write_index: jax.Array
    seq_len: np.ndarray  # int[B]: real prompt tokens per row


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prompt(graphdef, state, mask_ar, mask_input, size: int):
    model = nnx.merge(graphdef, state)
    input_mask, _, positions, masks = model.full_masks(mask_ar, mask_input)
    pad = lambda m: None if m is None else jnp.pad(m, ((0, 0), (0, 0), (0, size - m.shape[2])))
    angles = model.llm.angles(positions, model.llm.final_norm.scale[...].dtype)
    return input_mask, positions, {name: pad(m) for name, m in masks.items()}, angles


def decoding(model: api.Model, inputs, size: int) -> Decoding:
    """A zeroed cache of `size` slots with the prompt's slots 0..P-1 marked, and the prompt's positions and masks
    padded to the cache (generate.prefill's first lines)."""
    mask_ar = _ints(model, inputs["mask_ar"])
    mask_input = inputs.get("mask_input")
    mask_input = _ints(model, np.ones_like(inputs["mask_ar"]) if mask_input is None else mask_input)
    with _placed(model, {}) as unit:
        input_mask, positions, masks, angles = _prompt(*unit, mask_ar, mask_input, size)
    t = model.config.text
    b, p = input_mask.shape
    shape = (1, b, size, t.num_kv_heads, t.head_dim)
    zeros = lambda: jnp.zeros(shape, api.DTYPES[model.dtype], device=model.stream_where)
    valid, pos = np.zeros((b, size), bool), np.zeros((b, size), np.int32)
    valid[:, :p] = np.asarray(input_mask).astype(bool)
    pos[:, :p] = np.asarray(positions) - model.module.conventions.position_origin
    k, v = [zeros() for _ in range(t.depth)], [zeros() for _ in range(t.depth)]
    seq_len = np.asarray(input_mask).sum(-1).astype(np.int32)
    return Decoding(k, v, valid, pos, angles, masks, jnp.asarray(0, _INDEX), seq_len)


@functools.partial(jax.jit, static_argnums=(0,))
def _step_masks(graphdef, state, valid, rel, pos):
    model = nnx.merge(graphdef, state)
    angles = model.llm.angles(rel + model.conventions.position_origin, model.llm.final_norm.scale[...].dtype)
    return _cache_masks(model, valid[:, None, :], rel, pos, None), angles


def advance(model: api.Model, state: Decoding, rel: np.ndarray, write_index: int) -> None:
    """Make `state` the decode step writing slot `write_index` with one token per row at positions `rel` int[B]
    (no origin): generate.decode_step's first lines."""
    rel = np.asarray(rel, np.int32)[:, None]
    state.valid[:, write_index], state.pos[:, write_index] = True, rel[:, 0]
    state.write_index = jnp.asarray(write_index, _INDEX)
    with _placed(model, {}) as unit:
        state.masks, state.angles = _step_masks(*unit, model.put(state.valid), model.put(rel), model.put(state.pos))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(6, 7))  # the layer's k, v updated in place
def _cached_block(graphdef, state, local, x, angles, masks, k, v, write_index):
    model = nnx.merge(graphdef, state)
    x = x.astype(model.llm.final_norm.scale[...].dtype)
    x, _, cache = api._layer(model.llm.layers, 0)(
        x,
        angles,
        block_mask(masks, local),
        attn_softcap=model.attn_softcap,
        cache=(k, v, 0),
        write_index=write_index,
    )
    return api._out(x), cache[0], cache[1]


def cached_block(
    model: api.Model, weights: dict[str, np.ndarray], i: int, x: np.ndarray, state: Decoding
) -> np.ndarray:
    """Gemma block i on x (the prompt, or one token per row) against the cache, its k, v written at the state's
    slots: the block's output."""
    local = jnp.asarray(model.config.text.is_local_layer(i))
    with _placed(model, weights) as unit, api.matmul_precision(model.precision):
        out, state.k[i], state.v[i] = _cached_block(
            *unit, local, _input(model, x), state.angles, state.masks, state.k[i], state.v[i], state.write_index
        )
        return np.asarray(jax.device_get(out))


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, local):
    return api._out(nnx.merge(graphdef, state).embed_text(local))


def embed(model: api.Model, weights: dict[str, np.ndarray], local: np.ndarray) -> np.ndarray:
    """The text embedding (scaled by sqrt(D)) of tokens `local` int[B, T], indexes into the rows `weights` holds."""
    with _placed(model, weights) as unit:
        return np.asarray(jax.device_get(_embed(*unit, _ints(model, local))))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _head(graphdef, state, x, capped: bool):
    model = nnx.merge(graphdef, state)
    return api._out(model.llm.logits(x.astype(model.llm.final_norm.scale[...].dtype), capped=capped))


def head(model: api.Model, weights: dict[str, np.ndarray], x: np.ndarray, decode: bool) -> np.ndarray:
    """The logits of a chunk of the embedding table's rows on final-normed x, capped as generation caps them: the
    prompt's last token as the forward does ("always"), a decode step's unless "never"."""
    rule = model.module.conventions.final_softcap
    with _placed(model, weights) as unit, api.matmul_precision(model.precision):
        out = _head(*unit, _input(model, x), rule != "never" if decode else rule == "always")
        return np.asarray(jax.device_get(out))


def sampler(model: api.Model, seed: int, greedy: bool, temperature: float, top_k, top_p) -> Callable:
    """logits float[B, V] (numpy) -> int[B]: generate.sample with the keys the resident decode loop splits off."""
    box = {"key": jax.random.key(seed)}
    pick = jax.jit(sample, static_argnums=(2, 4, 5))

    def draw(logits: np.ndarray) -> np.ndarray:
        box["key"], sub = jax.random.split(box["key"])
        return np.asarray(pick(model.put(logits), sub, greedy, jnp.float32(temperature), top_k, top_p))

    return draw


def caches(model: api.Model, state: Decoding) -> dict[str, np.ndarray]:
    """The cache points llm/layerNN/{k,v}_cache float32[B, S, K, H] (float64 for a float64 model)."""
    out = {}
    for i in range(model.config.text.depth):
        out[pts.llm_k_cache(i)] = np.asarray(jax.device_get(api._out(state.k[i][0])))
        out[pts.llm_v_cache(i)] = np.asarray(jax.device_get(api._out(state.v[i][0])))
    return out
