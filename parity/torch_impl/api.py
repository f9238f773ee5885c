"""What users (and the CLI) import: build a model, score a batch, generate. Numpy in, numpy out.

inputs: image float32[B, H, W, 3] in [-1, 1]; text int32[B, L]; mask_ar int32[B, L]; optional mask_input int32[B, L]
(1 on real tokens; right padding).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from parity import points as pts
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.inputs import validate_inputs
from parity.torch_impl.generate import generate as _generate
from parity.torch_impl.load import load_canonical
from parity.torch_impl.model import PaliGemma

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("highest", "high", "default")


def build_model(config: PaliGemmaConfig, conventions: Conventions, dtype: str = "float32", device: str = "cpu",
                params: dict[str, np.ndarray] | None = None, precision: str = "highest") -> PaliGemma:
    """A PaliGemma in eval mode on `device` in `dtype`; parameters loaded from canonical numpy `params` if given
    (zeros otherwise). precision: float32 matmul precision, "highest" / "high" set with
    torch.set_float32_matmul_precision (process-wide), "default" leaves torch's setting alone."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        from parity.errors import ConfigError
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision != "default":
        torch.set_float32_matmul_precision(precision)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # allocate in the target dtype on the target device: no f32 detour
    try:
        with torch.device(device):
            model = PaliGemma(config, conventions)
    finally:
        torch.set_default_dtype(previous)
    if params is not None:
        load_canonical(model, params)
    model.precision = precision
    return model.eval()


def _tensors(model: PaliGemma, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    inputs = validate_inputs(inputs, model.config, "inputs")
    dev = model.llm.final_norm.scale.device
    t = {"image": torch.as_tensor(np.asarray(inputs["image"], np.float32), device=dev)}
    for key in ("text", "mask_ar", "mask_input"):
        if key in inputs:
            t[key] = torch.as_tensor(np.asarray(inputs[key]).astype(np.int64), device=dev)
    t.setdefault("mask_input", torch.ones_like(t["text"]))
    return t


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


@torch.inference_mode()
def forward(model: PaliGemma, inputs: dict[str, np.ndarray], points: list[str] | None = None
            ) -> dict[str, np.ndarray]:
    """Capture `points` (names from parity.points; None = logits only) as float32 numpy arrays."""
    wanted = [pts.LOGITS] if points is None else list(points)
    t = _tensors(model, inputs)
    _, out = model(t["image"], t["text"], t["mask_ar"], t["mask_input"], capture=wanted)
    return {name: _numpy(out[name]) for name in wanted}


@torch.inference_mode()
def generate(model: PaliGemma, inputs: dict[str, np.ndarray], max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int = 1, return_logits: bool = False, capture: list[str] | None = None,
             compile: str | None = None, ignore_eos: bool = False) -> dict[str, Any]:
    """Decode. Returns {"tokens": int32[B, max_new] (0 after EOS unless ignore_eos), "logits": float32[B, steps, V] if asked,
    captured points (cache points: float32[B, S_cache, K, H]), "decode_path": str}."""
    t = _tensors(model, inputs)
    g = _generate(model, t["image"], t["text"], t["mask_ar"], t["mask_input"], max_new_tokens=max_new_tokens,
                     greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id,
                     return_logits=return_logits, capture=capture or (), compile=compile,
                  ignore_eos=ignore_eos)
    result: dict[str, Any] = {"tokens": g.tokens.cpu().numpy().astype(np.int32), "decode_path": g.decode_path}
    if return_logits:
        result["logits"] = _numpy(g.logits)
    result.update({name: _numpy(x) for name, x in g.captured.items()})
    return result
