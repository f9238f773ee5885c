"""The block-streamed run's hook (parity/stream.py drives it; jax_impl/stream.py mirrors it): a PaliGemma with no
weights (on the meta device), and each unit run with only its weights placed, then released back to meta.

Every function takes the unit's weights as {canonical key: numpy array} (a layer's slice for stacked keys; the
embedding: the rows of the tokens present, or a chunk of rows for the head) and runs the same module code as the
resident model's forward, so a streamed point equals the resident one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
