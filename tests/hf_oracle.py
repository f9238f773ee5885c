"""transformers' PaliGemmaForConditionalGeneration as a test oracle: the transformers side of parity.hf_side
(built from `to_hf_config`, loaded from `spec.to_hf`, forward hooks recording our capture points), plus greedy
generation of one row."""

from __future__ import annotations

import numpy as np
import torch

from parity import hf_side
from parity.config import PaliGemmaConfig
from parity.hf_side import hf_batch


def hf_model(cfg: PaliGemmaConfig, params: dict[str, np.ndarray]):
    model = hf_side.hf_module(cfg, params)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def hf_forward(model, cfg: PaliGemmaConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every forward point of parity.points, recorded from transformers' modules by hooks."""
    from parity import points

    return hf_side.forward(hf_side.HFModel(model, cfg), inputs, points.forward_points(cfg))


@torch.no_grad()
def hf_generate_row(
    model, cfg: PaliGemmaConfig, inputs: dict[str, np.ndarray], row: int, max_new: int, eos_token_id: int | None = 1
):
    """Greedy generation for one row (its real tokens only: no padding). Returns (tokens [n], logits [n, V]).
    eos_token_id=None: exactly `max_new` tokens, through any <eos>."""
    n = int(inputs.get("mask_input", np.ones_like(inputs["text"]))[row].sum())
    one = {k: (v[row : row + 1] if k == "image" else v[row : row + 1, :n]) for k, v in inputs.items()}
    batch = hf_batch(cfg, one)
    res = model.generate(
        **batch,
        max_new_tokens=max_new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    tokens = res.sequences[0, batch["input_ids"].shape[1] :].numpy()
    logits = torch.stack(res.logits, dim=1)[0, :, : cfg.text.vocab_size].float().numpy()
    return tokens, logits


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
