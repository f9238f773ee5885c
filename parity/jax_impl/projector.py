"""Linear projector from the ViT width to the LLM width (big_vision's ViT `head`): z = x W + b, no activation.

Axis letters: B batch, T image tokens, Dv ViT width, D LLM width.
"""

from __future__ import annotations

import jax
from flax import nnx

from parity.jax_impl.attention import _param


class Projector(nnx.Module):
    """kernel [Dv, D], bias [D] (canonical `img/head/*`)."""

    def __init__(self, vision_width: int, width: int):
        self.kernel = _param(vision_width, width)
        self.bias = _param(width)

    def __call__(self, x: jax.Array) -> jax.Array:
        """In the promotion of x, kernel and bias (big_vision's `head` is a Dense without `dtype`: flax promotes, so
        a float16 input meets a trained float32 kernel in float32; jnp's `@` and `+` promote alike)."""
        return x @ self.kernel[...] + self.bias[...]  # "BTE,ED->BTD" with E = Dv (+ bias)
