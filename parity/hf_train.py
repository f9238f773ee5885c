"""transformers' own fine-tuning step (`parity train-step --impl transformers`), re-exported as
`parity.hf_side.train_step`.

Under the `transformers` convention what is run is exactly what a transformers user runs:
`PaliGemmaForConditionalGeneration(..., labels=...)` with the labels the full sequence (image placeholders, prefix and
padding -100, the suffix and its <eos> their ids, i.e. `mask_loss`), transformers' own shift inside
`ForCausalLMLoss`, its `cross_entropy(reduction="mean")` over every non-ignored token of the batch (`per_token`), its
logits over the stored vocabulary rows (padding rows inside the softmax) with `final_logit_softcapping`;
`token_type_ids` (0 image and prefix, 1 suffix and padding) and `attention_mask` (0 on padding) are passed, unless
the convention asks for transformers' causal prefix (`train_prefix=causal`, or `causal_prefix=True`): then
transformers trains a fully causal mask, image included, and one warning line says so.

Under `--convention big_vision` transformers' modules run big_vision's step (`big_vision_batch`): the model on
`[image ; text[:, :-1]]` with no input mask, given a 4D attention mask (transformers 5.x passes a 4D mask through
`create_causal_mask` and `create_sliding_window_causal_mask` unchanged, so every layer, Gemma 2's local ones
included, sees exactly it: big_vision's `cumsum(mask_ar)` pattern, where padding whose mask_ar is 0 joins the last
suffix token's group), positions from 0 (`position_ids`), the module built without `final_logit_softcapping`
(hf_side.build_model), and the loss computed here from transformers' logits over the real vocabulary rows (the
canonical table's, as torch and jax) with the convention's normalisation (`per_example`). The same loss, not
transformers' `labels=`, serves any convention other than the transformers preset with `per_token`.

Either way `loss.backward()` runs on the leaves `--trainable` selects (every other parameter has
`requires_grad=False`: no gradient is computed or held for it) and plain SGD updates those.
Gradients and updated leaves come back in canonical keys and layout through parity.spec (`Entry.from_hf`, the
inverse of the converter's transforms; the embedding's HF padding rows are dropped), so they line up with the
torch and jax steps. Under transformers' own loss the per-example losses are computed from its logits (float32, the
same shift and labels, every stored row) for the report only.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from parity import monitor, spec, training
from parity.conventions import PRESETS, Conventions
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


def runs_big_vision(conv: Conventions) -> bool:
    """Whether the step runs big_vision's view (the forward fields are big_vision's; hf_side.build_model accepts
    those and the transformers preset's only)."""
    return conv.forward_dict() == PRESETS["big_vision"].forward_dict()


def own_loss(conv: Conventions) -> bool:
    """transformers' `labels=` loss is the convention's only under its own preset with per_token normalisation."""
    return runs_big_vision(conv) or conv.loss_normalization != "per_token"


def step_batch(model, inputs: dict[str, np.ndarray], causal: bool) -> dict[str, Any]:
    """transformers' keyword arguments for a training forward under the model's convention: its own masks on the
    full sequence (hf_side.hf_batch; without token_type_ids when `causal`), or big_vision's (big_vision_batch)."""
    from parity.hf_side import hf_batch

    device = next(model.module.parameters()).device
    if runs_big_vision(model.conventions):
        return big_vision_batch(model, inputs, causal)
    batch = hf_batch(model.config, inputs, device)
    if causal:
        del batch["token_type_ids"]
    return batch


def big_vision_batch(model, inputs: dict[str, np.ndarray], causal: bool) -> dict[str, Any]:
    """big_vision's training forward in transformers' terms: `[image ; text[:, :-1]]`, `position_ids` from the
    convention's origin over every position (no input mask), and a 4D additive attention mask [B, 1, S, S] with
    query q seeing key k iff cumsum(mask_ar)[k] <= cumsum(mask_ar)[q] over `[0 * image ; mask_ar[:, :-1]]` (every
    position its own group when `causal`), the masked entries at the dtype's minimum as transformers' eager masks."""
    import torch

    cfg, conv = model.config, model.conventions
    p = next(model.module.parameters())
    s = training.shift(inputs)
    b, t = s["text"].shape[0], cfg.num_image_tokens
    mask_ar = np.concatenate([np.zeros((b, t), np.int64), s["mask_ar"]], axis=1)
    if causal:
        mask_ar = np.ones_like(mask_ar)
    cum = np.cumsum(mask_ar, axis=1)
    allowed = torch.as_tensor(cum[:, None, :] <= cum[:, :, None], device=p.device)  # [B, query, key]
    mask = torch.zeros(allowed.shape, dtype=p.dtype, device=p.device).masked_fill(~allowed, torch.finfo(p.dtype).min)
    n = mask_ar.shape[1]
    ids = np.concatenate([np.full((b, t), cfg.image_token_id), s["text"]], axis=1)
    return dict(
        input_ids=torch.as_tensor(ids, dtype=torch.long, device=p.device),
        pixel_values=torch.as_tensor(s["image"], device=p.device).permute(0, 3, 1, 2).contiguous(),
        attention_mask=mask[:, None],
        position_ids=(torch.arange(n, device=p.device) + conv.position_origin)[None].expand(b, n),
    )


def text_loss(logits, cfg, inputs: dict[str, np.ndarray], normalization: str, rows: int | None):
    """(loss, per-row losses) from transformers' logits of either view (full or shifted sequence: positions
    T_img .. T_img + L - 2 predict text[:, 1:], weighted by mask_loss[:, 1:]), the log-softmax over the first `rows`
    vocabulary rows (None: every stored row), normalised as training.normalize does."""
    import torch

    t, n = cfg.num_image_tokens, inputs["text"].shape[1] - 1
    z = logits[:, t : t + n, :rows]
    targets = torch.as_tensor(np.asarray(inputs["text"])[:, 1:], dtype=torch.long, device=z.device)
    w = torch.as_tensor(np.asarray(inputs["mask_loss"])[:, 1:], dtype=z.dtype, device=z.device)
    nll = -torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]
    return training.normalize((nll * w).sum(1), w.sum(1), normalization)


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
    """`options.steps` SGD steps of transformers' modules on one batch under the model's convention (its own loss
    under the transformers preset, see the module docstring) -> parity.training.TrainResult."""
    import torch

    from parity.inputs import validate_inputs

    cfg, module = model.config, model.module
    options.check()
    conv = model.conventions or PRESETS["transformers"]
    for flag, value in (("--frozen-dtype", options.frozen_dtype), ("--vit-matmul-dtype", options.vit_matmul_dtype)):
        if value != "float32":
            raise ConfigError(
                f"{flag} {value}: big_vision's mixed precision is not something transformers computes; "
                "the transformers side trains in float32 (run it with --impl torch or jax)"
            )
    if next(module.parameters()).dtype != torch.float32:
        raise ConfigError("the transformers side trains float32 parameters only; pass --dtype float32")
    if causal_prefix is None:
        causal_prefix = conv.train_prefix == "causal"
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
    batch = step_batch(model, inputs, causal_prefix)
    if causal_prefix and not runs_big_vision(conv):
        print(
            "warning: transformers side without token_type_ids: it trains a fully causal mask (image and prefix "
            "included), not PaliGemma's bidirectional prefix (train_prefix=causal)",
            file=sys.stderr,
        )
    ours = own_loss(conv)
    labels = None if ours else torch.as_tensor(labels_for(cfg, inputs), device=device)
    empty = training.empty_rows(np.asarray(inputs["mask_loss"])[:, 1:])
    records, first_grads = [], {}
    module.train()  # dropout is 0 in PaliGemma's configs: the step is deterministic
    try:
        for step in range(1, options.steps + 1):
            weights = {leaf: _canonical(pieces, lambda p: p) for leaf, pieces in params.items()}
            module.zero_grad(set_to_none=True)
            out = module(**batch, labels=labels)
            if ours:  # the convention's loss from transformers' logits over the real vocabulary rows
                loss, example = text_loss(out.logits, cfg, inputs, conv.loss_normalization, cfg.text.vocab_size)
            else:  # transformers' own; per-row means of the same token losses (every stored row) for the report
                loss = out.loss
                with torch.no_grad():
                    _, example = text_loss(out.logits.float(), cfg, inputs, "per_token", None)
            loss.backward()
            example = example.detach().cpu().numpy()
            grads = {leaf: _canonical(pieces, lambda p: p.grad) for leaf, pieces in params.items()}
            if step == 1:
                first_grads = {k: np.ascontiguousarray(v, np.float32) for k, v in grads.items()}
            leaf_g = {k: _norm(v) for k, v in grads.items()}
            records.append(
                StepRecord(
                    step=step,
                    loss=float(loss.detach()),
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
