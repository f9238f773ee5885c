"""An outside backend for parity, as a port of PaliGemma to another framework would ship one.

It registers `example` under the entry-point group `parity.backends` (see pyproject.toml) and implements
`parity.backend.BlockBackend`, so `parity compare --b example`, `capture --impl example`, `golden check --impl example`
and `compare --teacher-forced` all run it. To stay small it runs parity's own PyTorch implementation under its own
name. `PARITY_EXAMPLE_NUDGE=KEY:I,J,K:DELTA` adds DELTA to one element of the canonical parameter KEY when the model
is built: a deliberate fault of the kind a port makes, which a comparison against torch must find and place.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from parity.backend import BlockBackend
from parity.torch_impl import api as torch_api


def _nudged(params: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    spec = os.environ.get("PARITY_EXAMPLE_NUDGE")
    if not spec or params is None:
        return params
    key, index, delta = spec.split(":")
    params = dict(params)
    params[key] = np.array(params[key], copy=True)
    params[key][tuple(int(i) for i in index.split(","))] += float(delta)
    return params


class ExampleBackend:
    """parity.backend.BlockBackend: build_model, forward, generate, vit_block, llm_block and the device rules."""

    name = "example"
    build_options: tuple[str, ...] = ()

    def resolve_device(self, device: str) -> str:
        return torch_api.resolve_device(device)

    def device_description(self, device: str) -> str:
        return torch_api.device_description(device)

    def speed_warning(self, dtype: str, device: str) -> str | None:
        return None

    def build_model(self, config, conventions, dtype="float32", device="cpu", params=None, precision="highest"):
        return torch_api.build_model(config, conventions, dtype, device, _nudged(params), precision)

    def forward(self, model, inputs, points=None) -> dict[str, np.ndarray]:
        return torch_api.forward(model, inputs, points)

    def generate(self, model, inputs, max_new_tokens, **options) -> dict[str, Any]:
        return torch_api.generate(model, inputs, max_new_tokens, **options)

    def vit_block(self, model, i, x) -> dict[str, np.ndarray]:
        return torch_api.vit_block(model, i, x)

    def llm_block(self, model, i, x, inputs) -> dict[str, np.ndarray]:
        return torch_api.llm_block(model, i, x, inputs)

    def manifest(self, model) -> dict[str, Any]:
        return {"example_backend": "0.1.0"}

    def notes(self, model) -> dict[str, Any]:
        return {}


assert isinstance(ExampleBackend(), BlockBackend)
