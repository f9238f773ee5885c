"""One fine-tuning step, run `steps` times: big_vision's update_fn (the loss of parity.training) with
jax.value_and_grad and plain SGD on the trainable leaves. Numpy in, numpy out (TrainResult in canonical keys and
layout).

The NNX state is split by a path filter into trainable and frozen parts; the jitted step differentiates the
trainable part only, so the gradient tree holds exactly the trainable leaves. The model is updated in place.
The guide's float16 mixed precision (`_half`, `_text_embedding`; docs/training.md) passes the jitted step a frozen
state holding the values big_vision computes with; the model's own state is left as it was.
Mirrored definition for definition by parity/torch_impl/train.py.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parity import spec, training
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.jax_impl.decoder import Embedder
from parity.jax_impl.load import _flat
from parity.jax_impl.model import PaliGemma
from parity.jax_impl.precision import matmul_precision
from parity.training import StepRecord, TrainOptions, TrainResult

TRAIN_DTYPES = (jnp.float32, jnp.float64)  # float64: the finite-difference tests' models (JAX_ENABLE_X64)


def train_step(model, inputs: dict[str, np.ndarray], options: TrainOptions) -> TrainResult:
    """`options.steps` SGD steps on one batch (inputs with mask_loss); see parity.training for the loss."""

    options.check()
    if model.module.llm.final_norm.scale[...].dtype not in TRAIN_DTYPES:
        raise ConfigError(
            f"train-step: the model is {model.module.llm.final_norm.scale[...].dtype}; build it in float32"
        )
    batch = _batch(model, inputs)
    names = training.trainable_leaves(options, [e.key for e in spec.entries(model.config)])
    graphdef, leaves, frozen = _leaves(model, names)
    frozen = _half(frozen, options)
    if options.frozen_dtype == "float16" and training.EMBEDDING not in names:
        batch["text_embedding"] = _text_embedding(model, batch["text"])
    records, first = [], {}
    with matmul_precision(model.precision):
        for step in range(1, options.steps + 1):
            weight_norm = _norms(leaves)
            (loss, example), grads = _value_and_grad(graphdef, leaves, frozen, batch, options.vit_matmul_dtype)
            grad_norm = _norms(grads)
            if step == 1:
                first = _canonical(model, grads)
            records.append(
                StepRecord(
                    step=step,
                    loss=float(loss),
                    example_loss=[float(v) for v in np.asarray(example)],
                    grad_norm=float(np.sqrt(sum(v * v for v in grad_norm.values()))),
                    leaf_grad_norm=grad_norm,
                    leaf_weight_norm=weight_norm,
                )
            )
            leaves = _sgd(leaves, grads, options.lr)
    nnx.update(model.module, leaves)
    model.graphdef, model.state = nnx.split(model.module)
    return TrainResult(records, first, _canonical(model, leaves), training.empty_rows(np.asarray(batch["weights"])))


def _batch(model, inputs: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The shifted training batch (parity.training.shift) as arrays on the model's device (or mesh)."""
    checked = validate_inputs({k: v for k, v in inputs.items() if k != "mask_loss"}, model.config, "inputs")
    extra = {"mask_loss": inputs["mask_loss"]} if "mask_loss" in inputs else {}
    shifted = training.shift({**checked, **extra})
    dtype = model.module.llm.final_norm.scale[...].dtype
    b = {k: v.astype(np.int32) for k, v in shifted.items() if k != "image"}
    b["image"] = np.asarray(shifted["image"], np.float32).astype(dtype)
    return {k: model.put(v) for k, v in b.items()}


def _leaves(model, names: list[str]) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, trainable state, frozen state): the model's state split by canonical key."""
    wanted = set(names)
    trainable = lambda path, _value: "/".join(map(str, path)) in wanted
    return nnx.split(model.module, trainable, ...)


def _half(frozen: nnx.State, options: TrainOptions) -> nnx.State:
    """--frozen-dtype float16: a copy of the frozen state holding training.half_weights' values (float16-rounded;
    an RMSNorm scale such that 1 + scale is float16's), the frozen ViT leaves as float16 arrays under
    --vit-matmul-dtype float16, as big_vision holds them: with `_loss`'s dtype_mm the ViT's LayerNorms, adds and
    projector then follow their dtypes (vision.py). Trained leaves stay float32. The model's own state is not
    touched: frozen leaves leave bit-identical."""
    if options.frozen_dtype != "float16":
        return frozen

    def half(path, value):
        key = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        h = training.half_weights(key, np.asarray(jax.device_get(value)))
        vit16 = options.vit_matmul_dtype == "float16" and key.startswith("img/")
        return jax.device_put(h.astype(np.float16) if vit16 else h, value.sharding)

    return jax.tree_util.tree_map_with_path(half, frozen)


def _text_embedding(model, text: jax.Array) -> jax.Array:
    """The text tokens' embeddings formed from the frozen table in float16, as big_vision forms them (ppp/gemma.py
    Embedder.encode: the lookup, then `x *= sqrt(D).astype(x.dtype)`): the model's own encode run on the table
    cast to float16 (exact: half_weights rounds it so), eagerly, outside the jitted step, so each float16 op is
    rounded. Constant over the steps: the table is frozen."""
    table = SimpleNamespace(input_embedding=model.module.llm.embedder.input_embedding[...].astype(jnp.float16))
    return Embedder.encode(table, text, model.conventions.normalizer_dtype)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _value_and_grad(
    graphdef, leaves: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], vit_matmul_dtype: str = "float32"
):
    """((loss, per-row losses), gradient of the trainable leaves only); the per-row losses ride as the aux."""
    loss = lambda t: _loss(nnx.merge(graphdef, t, frozen), batch, vit_matmul_dtype)
    return jax.value_and_grad(loss, has_aux=True)(leaves)


def _loss(
    model: PaliGemma, batch: dict[str, jax.Array], vit_matmul_dtype: str = "float32"
) -> tuple[jax.Array, jax.Array]:
    """(loss, per-row losses) of the shifted batch: the text logits of a forward pass with no input mask (the
    final softcap as the convention puts it on forward logits), log-softmax over every vocabulary row. The text
    tokens are batch["text_embedding"] when given (float16-formed, `_text_embedding`)."""
    conv = model.conventions
    dtype_mm = jnp.float16 if vit_matmul_dtype == "float16" else None  # big_vision img.dtype_mm (vision.py)
    image_tokens = model.embed_image(batch["image"], dtype_mm=dtype_mm)
    text_tokens = batch["text_embedding"] if "text_embedding" in batch else model.embed_text(batch["text"])
    x = jnp.concatenate([image_tokens, text_tokens], axis=1).astype(batch["image"].dtype)  # big_vision: then float32
    no_input_mask = jnp.ones_like(batch["text"])
    _, _, positions, masks = model.full_masks(batch["mask_ar"], no_input_mask, causal=conv.train_prefix == "causal")
    x, _ = model.llm(x, positions, masks, attn_softcap=model.attn_softcap, capture=(), out={})
    logits = model.llm.logits(x[:, model.config.num_image_tokens :], capped=conv.final_softcap == "always")
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"].astype(nll.dtype)
    return training.normalize((nll * w).sum(1), w.sum(1), conv.loss_normalization)


def _norms(leaves: nnx.State) -> dict[str, float]:
    """{key: L2 norm over all its layers}, accumulated in float64."""
    return {
        k: float(np.sqrt(np.sum(np.asarray(v, np.float64) ** 2))) for k, v in _flat(nnx.to_pure_dict(leaves)).items()
    }


@jax.jit
def _sgd(leaves: nnx.State, grads: nnx.State, lr) -> nnx.State:
    """w <- w - lr * g."""
    return jax.tree.map(lambda p, g: p - lr * g, leaves, grads)


def _canonical(model, leaves: nnx.State) -> dict[str, np.ndarray]:
    """{key: float32 numpy in canonical layout}, in spec order (the NNX paths are the canonical keys, stacked layers
    included: load.py)."""
    flat = _flat(nnx.to_pure_dict(leaves))
    return {
        e.key: np.asarray(jax.device_get(flat[e.key])).astype(np.float32)
        for e in spec.entries(model.config)
        if e.key in flat
    }
