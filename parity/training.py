"""A fine-tuning step, framework-free: what to train, how, and what a step reports.

Both implementations (`torch_impl/train.py`, `jax_impl/train.py`) and the transformers side take `TrainOptions` and
return a `TrainResult`; the pipeline, the CLI (`parity train-step`) and comparisons read only these. Leaves are named
by their canonical npz keys (parity.spec), stacked leaves whole ([L, ...]), so a gradient of one side lines up with
the other's without renames.

The recipe of big_vision's PaliGemma fine-tuning guide is the default: the LLM's attention leaves trained with
plain SGD (w - lr * g), every other leaf frozen (no gradient computed or held), float32 everywhere unless
`frozen_dtype` / `vit_matmul_dtype` ask for the guide's float16 mixed precision.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from parity.errors import ConfigError, InputsError

DEFAULT_TRAINABLE = ("llm/layers/attn/*",)  # the guide's mask: the LLM's attention kernels
ALL = "all"
EMBEDDING = "llm/embedder/input_embedding"  # the tied table: its lookup is formed in its own dtype
FROZEN_DTYPES = ("float32", "float16")
VIT_MATMUL_DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    """fnmatch globs over canonical npz keys (`llm/layers/attn/*`); ("all",) trains every leaf."""

    steps: int = 1
    """SGD steps, each recomputing loss and gradients on the same batch."""

    lr: float = 0.03
    frozen_dtype: str = "float32"
    """"float16": frozen leaves rounded to float16 (the guide's mixed precision); trainable leaves stay float32."""

    vit_matmul_dtype: str = "float32"
    """"float16": big_vision's `img.dtype_mm`: the ViT's Dense/Conv operands cast to float16, the rest following
    its leaves' dtypes (float16 frozen under frozen_dtype float16, float32 trained or frozen float32)."""

    def check(self) -> None:
        """ConfigError (one line, exit 2) for options no step can run with."""
        if not self.trainable:
            raise ConfigError("--trainable: no glob given (default: llm/layers/attn/*; 'all' trains every leaf)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--steps {self.steps!r}: expected an integer >= 1")
        if not isinstance(self.lr, int | float) or isinstance(self.lr, bool) or not math.isfinite(self.lr):
            raise ConfigError(f"--lr {self.lr!r}: expected a finite number >= 0")
        if self.lr < 0:
            raise ConfigError(f"--lr {self.lr!r}: a negative learning rate ascends the loss; expected >= 0")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"--frozen-dtype {self.frozen_dtype!r}: expected one of {', '.join(FROZEN_DTYPES)}")
        if self.vit_matmul_dtype not in VIT_MATMUL_DTYPES:
            raise ConfigError(
                f"--vit-matmul-dtype {self.vit_matmul_dtype!r}: expected one of {', '.join(VIT_MATMUL_DTYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["trainable"] = list(self.trainable)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"training options: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        if "trainable" in d:
            d["trainable"] = tuple(d["trainable"])
        return cls(**d)


def is_rms_scale(key: str) -> bool:
    """The LLM's RMSNorm scales (`llm/layers/pre_attention_norm/scale`, `llm/final_norm/scale`, ...), whose
    `1 + scale` big_vision forms in the weight's dtype; the ViT's LayerNorms (`img/.../scale`) are not."""
    return key.startswith("llm/") and key.endswith("norm/scale")


def half_weights(key: str, value: np.ndarray) -> np.ndarray:
    """The values a frozen leaf `key` computes with under `--frozen-dtype float16`, in `value`'s dtype (float32 or
    float64): rounded to float16 (big_vision casts frozen leaves to float16 and computes in float32 on them); for
    an RMSNorm scale, r - 1 with r = float16(1 + float16(scale)), so that the module's `1 + scale`, formed in
    float32, is exactly r: big_vision forms `1 + scale` in float16 (ppp/gemma.py RMSNorm). r - 1 is exact in
    float32: r is a float16 value (lsb >= 2^-24, |r| <= 65504), so r - 1 needs at most 24 significant bits."""
    rounded = np.asarray(value).astype(np.float16)
    if is_rms_scale(key):
        rounded = np.float16(1) + rounded  # numpy's float16 add: computed wider, rounded once to float16
        return rounded.astype(value.dtype) - np.asarray(1, value.dtype)
    return rounded.astype(value.dtype)


def trainable_leaves(options: TrainOptions, leaves: Iterable[str]) -> list[str]:
    """The canonical keys `options.trainable` selects, in the order of `leaves` (the spec's). A glob that matches no
    leaf is a ConfigError listing every leaf name, so a typo is seen at once."""
    leaves = list(leaves)
    if ALL in options.trainable:
        return leaves
    for glob in options.trainable:
        if not any(fnmatch.fnmatchcase(leaf, glob) for leaf in leaves):
            raise ConfigError(f"--trainable {glob!r} matches no leaf; the leaves are: {', '.join(leaves)} (or 'all')")
    return [leaf for leaf in leaves if any(fnmatch.fnmatchcase(leaf, g) for g in options.trainable)]


@dataclasses.dataclass
class StepRecord:
    """What one SGD step measured (the figures people log while fine-tuning)."""

    step: int  # 1-based
    loss: float
    example_loss: list[float]  # one per row
    grad_norm: float  # global L2 norm over the trainable leaves
    leaf_grad_norm: dict[str, float]
    leaf_weight_norm: dict[str, float]  # before this step's update

    def to_dict(self) -> dict[str, Any]:
        ratio = {
            k: (g / w if w > 0 else None)
            for k, g in self.leaf_grad_norm.items()
            for w in (self.leaf_weight_norm.get(k, 0.0),)
        }
        return {**dataclasses.asdict(self), "leaf_grad_to_weight": ratio}


@dataclasses.dataclass
class TrainResult:
    steps: list[StepRecord]
    grads: dict[str, np.ndarray]
    """The FIRST step's gradient of every trainable leaf (and of no other), float32, canonical key and layout."""

    params: dict[str, np.ndarray]
    """The trainable leaves after the last step, canonical key and layout, float32."""

    empty_rows: list[int] = dataclasses.field(default_factory=list)
    """Rows with no loss token after the shift: they contribute 0 (big_vision's max(count, 1))."""

    def first_nonfinite(self) -> str | None:
        """'step N: loss' / 'step 1: gradient of LEAF' for the first NaN/Inf, else None."""
        for s in self.steps:
            if not math.isfinite(s.loss):
                return f"step {s.step}: loss {s.loss}"
            for k, g in s.leaf_grad_norm.items():
                if not math.isfinite(g):
                    return f"step {s.step}: gradient of {k}"
        return None


# -- the loss, framework-free ---------------------------------------------------------------------------------------
# big_vision's update_fn: the model runs on text[:, :-1], mask_ar[:, :-1] with no input mask (the last real token and
# the padding may attend each other; their targets are masked, so neither loss nor gradients change); position i
# predicts text[:, i + 1] with weight mask_loss[:, i + 1]; log-softmax over every vocabulary row the logits hold (the
# stored table's, padded rows included). The training logits carry the final softcap exactly when the forward
# logits do (`Conventions.final_softcap`): big_vision ("decode_only") trains on its uncapped `text_logits`,
# transformers ("always") and keras-hub apply the cap.


def mask_loss_of(inputs: dict[str, Any]) -> np.ndarray:
    """The inputs' mask_loss as int32[B, L] (1 on the tokens to learn), or InputsError (exit 2) saying how to get
    one. The training step needs it; forward runs ignore it."""
    text = np.asarray(inputs["text"])
    if "mask_loss" not in inputs:
        raise InputsError(
            "inputs: no 'mask_loss' (1 on the suffix tokens to learn); write training inputs with "
            "parity inputs --suffix"
        )
    m = np.asarray(inputs["mask_loss"])
    if m.shape != text.shape or not (np.issubdtype(m.dtype, np.integer) or m.dtype == bool):
        raise InputsError(
            f"inputs: mask_loss: expected int32{list(text.shape)} (as text), found {m.dtype}{list(m.shape)}"
        )
    if not np.isin(m, (0, 1)).all():
        raise InputsError(f"inputs: mask_loss: expected values 0/1, found {sorted(set(np.unique(m).tolist()))[:5]}")
    if text.shape[1] < 2:
        raise InputsError(f"inputs: text: a training step needs rows of at least 2 tokens, found {list(text.shape)}")
    return m.astype(np.int32)


def shift(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The training view of validated inputs: the model's inputs (image, text[:, :-1], mask_ar[:, :-1], no input
    mask) plus "targets" text[:, 1:] and "weights" mask_loss[:, 1:] (int32[B, L - 1])."""
    m = mask_loss_of(inputs)
    text = np.asarray(inputs["text"]).astype(np.int32)
    return {
        "image": np.asarray(inputs["image"]),
        "text": text[:, :-1],
        "mask_ar": np.asarray(inputs["mask_ar"]).astype(np.int32)[:, :-1],
        "targets": text[:, 1:],
        "weights": m[:, 1:],
    }


def empty_rows(weights: np.ndarray) -> list[int]:
    """Rows with no loss token (after the shift): they contribute 0 to the loss."""
    return [int(r) for r in np.flatnonzero(np.asarray(weights).sum(axis=1) == 0)]


def normalize(token_loss_sum: np.ndarray, counts: np.ndarray, normalization: str) -> tuple[Any, Any]:
    """(loss, per-row losses) from per-row sums of token losses and per-row loss-token counts, for any array type
    with numpy's operators (numpy, torch, jax): per row sum / max(count, 1); the loss is their mean
    ("per_example") or the batch's sum over its total count, at least 1 ("per_token")."""
    example = token_loss_sum / _at_least_one(counts)
    if normalization == "per_example":
        return example.mean(), example
    if normalization == "per_token":
        return token_loss_sum.sum() / _at_least_one(counts.sum()), example
    raise ValueError(f"loss_normalization {normalization!r}; allowed: per_example, per_token")


def _at_least_one(n):
    return n + (n < 1) * (1 - n)  # max(n, 1) for numpy, torch and jax values alike (n >= 0)


def reference_loss(logits: np.ndarray, inputs: dict[str, Any], conventions) -> tuple[float, np.ndarray]:
    """(loss, per-row losses) in numpy float64, from `logits` float[B, *, V] of a forward pass on the shifted inputs
    (its last L - 1 positions are the text's) under `conventions` (its loss_normalization): the independent
    definition the implementations' steps are tested against."""
    s = shift(inputs)
    n = s["targets"].shape[1]
    z = np.asarray(logits, np.float64)[:, -n:, :]
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, s["targets"][..., None].astype(np.int64), axis=-1)[..., 0]
    w = s["weights"].astype(np.float64)
    loss, example = normalize((nll * w).sum(axis=1), w.sum(axis=1), conventions.loss_normalization)
    return float(loss), example
