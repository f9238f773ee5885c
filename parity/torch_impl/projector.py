"""Linear projector from the ViT width to the LLM width (big_vision's ViT `head`): z = x W + b, no activation.

Axis letters: B batch, T image tokens, Dv ViT width, D LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity.torch_impl.attention import _param


class Projector(nn.Module):
    """kernel [Dv, D], bias [D] (canonical `img/head/*`)."""

    def __init__(self, vision_width: int, width: int):
        super().__init__()
        self.kernel = _param(vision_width, width)
        self.bias = _param(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the promotion of x, kernel and bias (big_vision's `head` is a Dense without `dtype`: flax promotes, so
        a float16 input meets a trained float32 kernel in float32; jnp's `@` and `+` do the same in jax_impl)."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.kernel.dtype), self.bias.dtype)
        return F.linear(x.to(dtype), self.kernel.to(dtype).t(), self.bias.to(dtype))  # "BTE,ED->BTD" (+ bias)
