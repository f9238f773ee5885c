"""One fine-tuning step, run `steps` times: big_vision's update_fn (the loss of parity.training) with
jax.value_and_grad and plain SGD on the trainable leaves. Numpy in, numpy out (TrainResult in canonical keys and
layout).

The NNX state is split by a path filter into trainable and frozen parts; the jitted step differentiates the
trainable part only, so the gradient tree holds exactly the trainable leaves. The model is updated in place.
Mirrored definition for definition by parity/torch_impl/train.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parity import spec, training
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.jax_impl.load import _flat
from parity.jax_impl.model import PaliGemma
from parity.training import StepRecord, TrainOptions, TrainResult

TRAIN_DTYPES = (jnp.float32, jnp.float64)  # float64: the finite-difference tests' models (JAX_ENABLE_X64)


def train_step(model, inputs: dict[str, np.ndarray], options: TrainOptions) -> TrainResult:
    """`options.steps` SGD steps on one batch (inputs with mask_loss); see parity.training for the loss."""
    from parity.jax_impl.api import matmul_precision  # api re-exports train_step: imported here, not at the top

    options.check()
    training.check_implemented(options)
    if model.module.llm.final_norm.scale[...].dtype not in TRAIN_DTYPES:
        raise ConfigError(
            f"train-step: the model is {model.module.llm.final_norm.scale[...].dtype}; build it in float32"
        )
    batch = _batch(model, inputs)
    names = training.trainable_leaves(options, [e.key for e in spec.entries(model.config)])
    graphdef, leaves, frozen = _leaves(model, names)
    records, first = [], {}
    with matmul_precision(model.precision):
        for step in range(1, options.steps + 1):
            weight_norm = _norms(leaves)
            (loss, example), grads = _value_and_grad(graphdef, leaves, frozen, batch)
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


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(graphdef, leaves: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array]):
    """((loss, per-row losses), gradient of the trainable leaves only); the per-row losses ride as the aux."""
    return jax.value_and_grad(lambda t: _loss(nnx.merge(graphdef, t, frozen), batch), has_aux=True)(leaves)


def _loss(model: PaliGemma, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(loss, per-row losses) of the shifted batch: the text logits of a forward pass with no input mask (the
    final softcap as the convention puts it on forward logits), log-softmax over every vocabulary row."""
    conv = model.conventions
    x = model.embed(batch["image"], batch["text"])
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
