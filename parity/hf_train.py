"""transformers' own fine-tuning step (`parity train-step --impl transformers`), re-exported as
`parity.hf_side.train_step`.

What is run is exactly what a transformers user runs: `PaliGemmaForConditionalGeneration(..., labels=...)` with the
labels the full sequence (image placeholders, prefix and padding -100, the suffix and its <eos> their ids, i.e.
`mask_loss`), transformers' own shift inside `ForCausalLMLoss`, its `cross_entropy(reduction="mean")` over every
non-ignored token of the batch (`per_token`), its logits over the stored vocabulary rows (padding rows inside the
softmax) with `final_logit_softcapping`; `loss.backward()` on the leaves `--trainable` selects (every other
parameter has `requires_grad=False`: no gradient is computed or held for it) and plain SGD on those.
`token_type_ids` (0 image and prefix, 1 suffix and padding) and `attention_mask` (0 on padding) are passed, unless
the convention asks for transformers' causal prefix (`train_prefix=causal`, or `causal_prefix=True`): then
transformers trains a fully causal mask, image included, and one warning line says so.

Gradients and updated leaves come back in canonical keys and layout through parity.spec (`Entry.from_hf`, the
inverse of the converter's transforms; the embedding's HF padding rows are dropped), so they line up with the
torch and jax steps. Per-example losses are computed from transformers' logits (float32, the same shift and
labels) for the report only; `loss` is transformers' own.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from parity import monitor, spec
from parity.errors import ConfigError, InputsError
from parity.training import StepRecord, TrainOptions, TrainResult, trainable_leaves

IGNORE = -100


def hf_name(key: str) -> str:
    """An on-disk (spec) HF key -> the name of its parameter in transformers 5.x's module."""
    from parity.hf_side import _RENAMES

    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def labels_for(cfg, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """int64[B, T_img + L]: the text ids where mask_loss is 1, -100 on the image, prefix and padding."""
    b = inputs["text"].shape[0]
    text = np.where(inputs["mask_loss"] == 1, inputs["text"], IGNORE).astype(np.int64)
    return np.concatenate([np.full((b, cfg.num_image_tokens), IGNORE, np.int64), text], axis=1)


def _leaf_params(module, cfg, leaves: list[str]) -> dict[str, list[tuple[Any, spec.Entry, tuple]]]:
    """Each canonical leaf -> its transformers parameters with their (entry, address) in the canonical tensor."""
    ents = {e.key: e for e in spec.entries(cfg)}
    out = {}
    for leaf in leaves:
        e = ents[leaf]
        out[leaf] = [(module.get_parameter(hf_name(k)), e, addr) for k, addr in e.hf_keys()]
    return out


def _canonical(pieces, of) -> np.ndarray:
    """The canonical float32 tensor of a leaf from its HF parameters' `of(p)` (data or grad)."""
    e = pieces[0][1]
    return spec.assemble(e, {addr: e.from_hf(of(p).detach().float().cpu().numpy()) for p, _, addr in pieces})


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


def train_step(model, inputs: dict[str, np.ndarray], options: TrainOptions, *, causal_prefix: bool | None = None):
    """`options.steps` SGD steps of transformers' own loss on one batch -> parity.training.TrainResult."""
    import torch

    from parity.hf_side import hf_batch
    from parity.inputs import validate_inputs

    cfg, module = model.config, model.module
    options.check()
    conv = getattr(model, "conventions", None)
    if getattr(conv, "loss_normalization", "per_token") != "per_token":
        raise ConfigError(
            "the transformers side trains with transformers' own loss, a token-level mean over the batch "
            "(loss_normalization=per_token); per_example is big_vision's: run it with --impl torch or jax"
        )
    for flag, value in (("--frozen-dtype", options.frozen_dtype), ("--vit-matmul-dtype", options.vit_matmul_dtype)):
        if value != "float32":
            raise ConfigError(
                f"{flag} {value}: big_vision's mixed precision is not something transformers computes; "
                "the transformers side trains in float32 (run it with --impl torch or jax)"
            )
    if next(module.parameters()).dtype != torch.float32:
        raise ConfigError("the transformers side trains float32 parameters only; pass --dtype float32")
    if causal_prefix is None:
        causal_prefix = getattr(conv, "train_prefix", "bidirectional") == "causal"
    inputs = validate_inputs(inputs, cfg, "inputs")
    if "mask_loss" not in inputs:
        raise InputsError(
            "inputs: no 'mask_loss' (the tokens to learn); make training inputs with `parity inputs --suffix`"
        )
    leaves = trainable_leaves(options, [e.key for e in spec.entries(cfg)])
    params = _leaf_params(module, cfg, leaves)
    trained = {id(p) for pieces in params.values() for p, _, _ in pieces}
    for p in module.parameters():
        p.requires_grad_(id(p) in trained)
    device = next(module.parameters()).device
    batch = hf_batch(cfg, inputs, device)
    if causal_prefix:
        del batch["token_type_ids"]
        print(
            "warning: transformers side without token_type_ids: it trains a fully causal mask (image and prefix "
            "included), not PaliGemma's bidirectional prefix (train_prefix=causal)",
            file=sys.stderr,
        )
    labels = torch.as_tensor(labels_for(cfg, inputs), device=device)
    targets = labels[:, 1:]
    counts = (targets != IGNORE).sum(1)
    empty = [int(i) for i in torch.nonzero(counts == 0).flatten()]
    records, first_grads = [], {}
    module.train()  # dropout is 0 in PaliGemma's configs: the step is deterministic
    try:
        for step in range(1, options.steps + 1):
            weights = {leaf: _canonical(pieces, lambda p: p) for leaf, pieces in params.items()}
            module.zero_grad(set_to_none=True)
            out = module(**batch, labels=labels)
            out.loss.backward()
            with torch.no_grad():  # per-row means of the same token losses, for the report
                logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
                tok = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != IGNORE)
                example = (tok.sum(1) / counts.clamp(min=1)).cpu().numpy()
            grads = {leaf: _canonical(pieces, lambda p: p.grad) for leaf, pieces in params.items()}
            if step == 1:
                first_grads = {k: np.ascontiguousarray(v, np.float32) for k, v in grads.items()}
            leaf_g = {k: _norm(v) for k, v in grads.items()}
            records.append(
                StepRecord(
                    step=step,
                    loss=float(out.loss.detach()),
                    example_loss=[float(x) for x in example],
                    grad_norm=float(np.sqrt(sum(g * g for g in leaf_g.values()))),
                    leaf_grad_norm=leaf_g,
                    leaf_weight_norm={k: _norm(v) for k, v in weights.items()},
                )
            )
            with torch.no_grad():
                for pieces in params.values():
                    for p, _, _ in pieces:
                        p.sub_(options.lr * p.grad)
            monitor.tick("step")
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    final = {leaf: np.ascontiguousarray(_canonical(pieces, lambda p: p), np.float32) for leaf, pieces in params.items()}
    return TrainResult(steps=records, grads=first_grads, params=final, empty_rows=empty)
