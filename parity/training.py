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

from parity.errors import ConfigError

DEFAULT_TRAINABLE = ("llm/layers/attn/*",)  # the guide's mask: the LLM's attention kernels
ALL = "all"
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
    """"float16": the ViT's activations in float16 (big_vision `img.dtype_mm`)."""

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
