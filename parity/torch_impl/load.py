"""Load canonical parameters (big_vision npz keys without `params/`, layers stacked on axis 0) into the model.

Every key and shape is checked against `parity.spec.entries(config)` before the model is touched; values arrive as
blocks (parity.param_blocks: a layer, rows of one, or a whole tensor) copied into the parameters already allocated.
Module names mirror the keys, so the only transform is unstacking the layer axis:
    llm/layers/attn/q_einsum/w [L, N, D, H]  ->  llm.layers.{i}.attn.q_einsum.w [N, D, H]
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np
import torch

from parity import param_blocks, spec
from parity.errors import CheckpointError
from parity.param_blocks import ParamBlocks
from parity.spec import check_params

_STACKS = {"llm/layers/": "llm.layers.{i}.", "img/Transformer/encoderblock/": "img.Transformer.encoderblock.{i}."}


def torch_names(key: str, layers: int | None) -> list[str]:
    """Parameter names of one canonical key: one per layer for stacked keys."""
    for prefix, template in _STACKS.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :].replace("/", ".")
            return [template.format(i=i) + rest for i in range(layers)]
    return [key.replace("/", ".")]


def to_torch(x: np.ndarray) -> torch.Tensor:
    """numpy (float32 / float16 / ml_dtypes.bfloat16) -> torch tensor of the same dtype, no rounding."""
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    if x.dtype in (np.float32, np.float16, np.float64):
        return torch.from_numpy(x)
    raise CheckpointError(f"unsupported parameter dtype {x.dtype} (expected float32, float16 or bfloat16)")


def _pairs(model, config) -> Iterator[tuple[str, int | None, torch.nn.Parameter]]:
    named = dict(model.named_parameters())
    for e in spec.entries(config):
        for i, name in enumerate(torch_names(e.key, e.layers)):
            yield e.key, (i if e.layers is not None else None), named[name]


@torch.no_grad()
def load_canonical(model, params: dict[str, np.ndarray] | ParamBlocks, source: str = "params") -> None:
    """Copy canonical parameters (a numpy dict, or ParamBlocks streamed from a checkpoint) into `model`, block by
    block, each cast to the parameter's dtype and device by `copy_` into the tensor the model already holds: no
    second copy of the model. Checks every key and shape first."""
    config = model.config
    blocks = param_blocks.of(params, source)
    check_params(config, blocks.shape_view(), blocks.source)
    targets: dict[str, list[torch.nn.Parameter]] = {}
    for key, _, p in _pairs(model, config):
        targets.setdefault(key, []).append(p)
    stacked = {e.key for e in spec.entries(config) if e.layers is not None}
    coverage = param_blocks.Coverage(blocks.shapes)
    for key, index, rows, x in blocks.blocks:
        coverage.add(key, index, rows, x)
        if key in stacked and not index:  # whole layers rows[0]..rows[1]
            a = rows[0] if rows else 0
            for j in range(np.shape(x)[0]):
                targets[key][a + j].copy_(to_torch(x[j]))
            continue
        dst = targets[key][index[0]][index[1:]] if key in stacked else targets[key][0][index]
        (dst if rows is None else dst[rows[0] : rows[1]]).copy_(to_torch(x))  # copy_ casts; keeps the layout
    coverage.check()
    seen = {id(p) for ps in targets.values() for p in ps}
    missed = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missed:  # a model/spec disagreement, not a user error
        raise AssertionError(f"model parameters not covered by the spec: {missed}")


def state_to_canonical(model) -> dict[str, np.ndarray]:
    """The model's parameters as canonical float32 numpy arrays (stacked layers)."""
    grouped: dict[str, list[np.ndarray]] = {}
    for key, _, p in _pairs(model, model.config):
        grouped.setdefault(key, []).append(p.detach().float().cpu().numpy())
    return {k: (np.stack(v) if len(v) > 1 or _stacked(k) else v[0]) for k, v in grouped.items()}


def _stacked(key: str) -> bool:
    return any(key.startswith(p) for p in _STACKS)
