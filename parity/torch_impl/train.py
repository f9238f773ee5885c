"""One fine-tuning step, run `steps` times: big_vision's update_fn (the loss of parity.training) with autograd and
plain SGD on the trainable leaves. Numpy in, numpy out (TrainResult in canonical keys and layout).

Frozen parameters get requires_grad=False before anything runs, so autograd neither computes nor holds a gradient
for them; gradients are taken with torch.autograd.grad (no `.grad` is ever written). The model is updated in place.
The guide's float16 mixed precision (`_half`, `_text_embedding`; docs/training.md) swaps the frozen parameters'
data for the values big_vision computes with and puts the originals back afterwards.
Mirrored definition for definition by parity/jax_impl/train.py.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from parity import spec, training
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.torch_impl.decoder import Embedder
from parity.torch_impl.load import torch_names
from parity.torch_impl.model import PaliGemma
from parity.torch_impl.precision import matmul_precision
from parity.training import StepRecord, TrainOptions, TrainResult

TRAIN_DTYPES = (torch.float32, torch.float64)  # float64: the finite-difference tests' models


def train_step(model: PaliGemma, inputs: dict[str, np.ndarray], options: TrainOptions) -> TrainResult:
    """`options.steps` SGD steps on one batch (inputs with mask_loss); see parity.training for the loss."""

    options.check()
    if model.llm.final_norm.scale.dtype not in TRAIN_DTYPES:
        raise ConfigError(f"train-step: the model is {model.llm.final_norm.scale.dtype}; build it in float32")
    batch = _batch(model, inputs)
    names = training.trainable_leaves(options, [e.key for e in spec.entries(model.config)])
    leaves = _leaves(model, names)
    if options.frozen_dtype == "float16" and training.EMBEDDING not in leaves:
        batch["text_embedding"] = _text_embedding(model, batch["text"])
    records, first = [], {}
    with matmul_precision(model.precision), _half(model, leaves, options):
        for step in range(1, options.steps + 1):
            weight_norm = _norms(leaves)
            (loss, example), grads = _value_and_grad(model, leaves, batch, options.vit_matmul_dtype)
            grad_norm = _norms(grads)
            if step == 1:
                first = _canonical(model, grads)
            records.append(
                StepRecord(
                    step=step,
                    loss=float(loss),
                    example_loss=[float(v) for v in example.cpu()],
                    grad_norm=float(np.sqrt(sum(v * v for v in grad_norm.values()))),
                    leaf_grad_norm=grad_norm,
                    leaf_weight_norm=weight_norm,
                )
            )
            _sgd(leaves, grads, options.lr)
    return TrainResult(records, first, _canonical(model, leaves), training.empty_rows(batch["weights"].cpu().numpy()))


def _batch(model: PaliGemma, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The shifted training batch (parity.training.shift) as tensors on the model's device."""
    checked = validate_inputs({k: v for k, v in inputs.items() if k != "mask_loss"}, model.config, "inputs")
    extra = {"mask_loss": inputs["mask_loss"]} if "mask_loss" in inputs else {}
    shifted = training.shift({**checked, **extra})
    dev, dtype = model.llm.final_norm.scale.device, model.llm.final_norm.scale.dtype
    b = {k: torch.as_tensor(v.astype(np.int64), device=dev) for k, v in shifted.items() if k != "image"}
    b["image"] = torch.as_tensor(np.asarray(shifted["image"], np.float32), device=dev).to(dtype)
    return b


def _leaves(model: PaliGemma, names: list[str]) -> dict[str, list[torch.nn.Parameter]]:
    """{trainable key: its parameters (one per layer when stacked)}; every parameter outside `names` frozen."""
    named = dict(model.named_parameters())
    for p in named.values():
        p.requires_grad_(False)
    leaves = {}
    for e in spec.entries(model.config):
        if e.key in names:
            leaves[e.key] = [named[n] for n in torch_names(e.key, e.layers)]
            for p in leaves[e.key]:
                p.requires_grad_(True)
    return leaves


@contextlib.contextmanager
def _half(model: PaliGemma, leaves: dict[str, list[torch.nn.Parameter]], options: TrainOptions):
    """--frozen-dtype float16: inside, every frozen parameter holds training.half_weights' values (float16-rounded;
    an RMSNorm scale such that 1 + scale is float16's), and under --vit-matmul-dtype float16 the frozen ViT leaves
    are float16 tensors, as big_vision holds them: with `_loss`'s dtype_mm the ViT's LayerNorms, adds and projector then
    follow their dtypes (vision.py). Trained leaves stay float32. The original data is put back on exit: frozen
    leaves leave bit-identical."""
    named, saved = dict(model.named_parameters()), {}
    try:
        for e in spec.entries(model.config) if options.frozen_dtype == "float16" else ():
            if e.key in leaves:
                continue
            vit16 = options.vit_matmul_dtype == "float16" and e.key.startswith("img/")
            for n in torch_names(e.key, e.layers):
                p = named[n]
                half = torch.as_tensor(training.half_weights(e.key, p.data.cpu().numpy()), device=p.device)
                saved[n], p.data = p.data, (half.half() if vit16 else half)
        yield
    finally:
        for n, data in saved.items():
            named[n].data = data


def _text_embedding(model: PaliGemma, text: torch.Tensor) -> torch.Tensor:
    """The text tokens' embeddings formed from the frozen table in float16, as big_vision forms them (ppp/gemma.py
    Embedder.encode: the lookup, then `x *= sqrt(D).astype(x.dtype)`): the model's own encode run on the table
    cast to float16 (exact: half_weights rounds it so). Constant over the steps: the table is frozen."""
    table = SimpleNamespace(input_embedding=model.llm.embedder.input_embedding.detach().half())
    with torch.no_grad():
        return Embedder.encode(table, text, model.conventions.normalizer_dtype)


def _value_and_grad(
    model: PaliGemma,
    leaves: dict[str, list[torch.nn.Parameter]],
    batch: dict[str, torch.Tensor],
    vit_matmul_dtype: str = "float32",
):
    """((loss, per-row losses), {key: gradient of each of its parameters}): torch.autograd.grad over the trainable
    parameters only, so no `.grad` is written and nothing is held for frozen ones."""
    loss, example = _loss(model, batch, vit_matmul_dtype)
    flat = torch.autograd.grad(loss, [p for ps in leaves.values() for p in ps])
    grads, at = {}, 0
    for key, ps in leaves.items():
        grads[key], at = list(flat[at : at + len(ps)]), at + len(ps)
    return (loss.detach(), example.detach()), grads


def _loss(
    model: PaliGemma, batch: dict[str, torch.Tensor], vit_matmul_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row losses) of the shifted batch: the text logits of a forward pass with no input mask (the final
    softcap as the convention puts it on forward logits), log-softmax over every vocabulary row. The text tokens
    are batch["text_embedding"] when given (float16-formed, `_text_embedding`)."""
    conv = model.conventions
    dtype_mm = torch.float16 if vit_matmul_dtype == "float16" else None  # big_vision img.dtype_mm (vision.py)
    image_tokens = model.embed_image(batch["image"], dtype_mm=dtype_mm)
    text_tokens = batch["text_embedding"] if "text_embedding" in batch else model.embed_text(batch["text"])
    x = torch.cat([image_tokens, text_tokens], dim=1).to(batch["image"].dtype)  # big_vision: concat, then float32
    no_input_mask = torch.ones_like(batch["text"])
    _, _, positions, masks = model.full_masks(batch["mask_ar"], no_input_mask, causal=conv.train_prefix == "causal")
    x, _ = model.llm(x, positions, masks, attn_softcap=model.attn_softcap, capture=(), out={})
    logits = model.llm.logits(x[:, model.config.num_image_tokens :], capped=conv.final_softcap == "always")
    logp = torch.log_softmax(logits, dim=-1)
    nll = -torch.gather(logp, -1, batch["targets"][..., None])[..., 0]
    w = batch["weights"].to(nll.dtype)
    return training.normalize((nll * w).sum(1), w.sum(1), conv.loss_normalization)


def _norms(leaves: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """{key: L2 norm over all its layers}, accumulated in float64."""
    return {
        k: float(torch.sqrt(sum(torch.sum(t.detach().double() ** 2) for t in ts)).cpu()) for k, ts in leaves.items()
    }


def _sgd(leaves: dict[str, list[torch.nn.Parameter]], grads: dict[str, list[torch.Tensor]], lr: float) -> None:
    """w <- w - lr * g, in place."""
    with torch.no_grad():
        for key, ps in leaves.items():
            for p, g in zip(ps, grads[key], strict=True):
                p.sub_(lr * g)


def _canonical(model: PaliGemma, leaves: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """{key: float32 numpy in canonical layout}: per-layer tensors stacked on axis 0 (torch holds the canonical axis
    order of each layer: load.py only unstacks)."""
    stacked = {e.key: e.layers is not None for e in spec.entries(model.config)}
    out = {}
    for key, ts in leaves.items():
        arrays = [t.detach().float().cpu().numpy() for t in ts]
        out[key] = np.stack(arrays) if stacked[key] else arrays[0]
    return out
