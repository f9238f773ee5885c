"""transformers' training step point by point (`parity compare --train-step` with a transformers side), re-exported
as `parity.hf_side.train_points`.

What runs is transformers' module as parity.hf_train runs it under the model's convention (`step_batch`):
- the `transformers` preset: `PaliGemmaForConditionalGeneration` on the full sequence with token_type_ids and
  attention_mask (without token_type_ids under train_prefix=causal), and its loss as `labels=` computes it (the
  shift inside, -100 on image, prefix and padding, a token mean over the batch);
- `big_vision`: the same module on `[image ; text[:, :-1]]` with big_vision's own attention pattern as a 4D mask
  (no input mask: padding whose mask_ar is 0 joins the last suffix token's group, so the <eos> sees it), positions
  from 0 and no final softcap (hf_side.build_model), and the per-example loss (hf_train.big_vision_batch).
In both the loss is computed from transformers' logits (hf_train.text_loss) with the convention's normalisation over
the real vocabulary rows only, where transformers' own loss also spans the HF embedding's padding rows
(`hf_vocab_rows`), which the canonical checkpoint (torch, jax) does not have. Plain SGD on the trainable leaves for
steps > 1.

Forward hooks record the capture points from the modules that compute them (as hf_side.forward does) and add a
zero probe to the output of every module that ends a unit (x + 0 is x exactly), so torch.autograd.grad of the loss
with respect to the probes gives the gradient at every unit input (points.train_units); parameter gradients come
back in canonical keys and layout (spec).

Under the transformers preset transformers runs the unshifted sequence (S = T + L positions) where torch and jax run
the shifted one (S - 1): every [B, S, ...] point is cut to its first S - 1 positions. The last position predicts
nothing (its gradient is zero) and no earlier one attends to it, so the cut loses nothing compared. Under big_vision
it runs the shifted sequence itself, so every position, the <eos> and the padding included, is big_vision's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parity import points as pts
from parity import spec
from parity.errors import ConfigError, InputsError
from parity.hf_train import _canonical, _leaf_params, step_batch, text_loss
from parity.training import TrainOptions, trainable_leaves


def _boundaries(module, cfg) -> list[tuple[Any, list[str]]]:
    """(module, the points its output is: forward points and the gradient points of the units it feeds)."""
    vt, lm = module.model.vision_tower, module.model.language_model
    v, t = cfg.vision.depth, cfg.text.depth
    img_in = [pts.grad_img_block_in(i) for i in range(v)] + [pts.GRAD_IMG_FINAL_NORM_IN]
    llm_in = [pts.grad_llm_block_in(i) for i in range(1, t)] + [pts.GRAD_FINAL_NORM_IN]
    out: list[tuple[Any, list[str]]] = [(vt.embeddings, [pts.IMG_POS_EMBED, img_in[0]])]
    for i, layer in enumerate(vt.encoder.layers):
        out.append((layer.self_attn, [pts.img_block_attn(i)]))
        out.append((layer, [pts.img_block_out(i), img_in[i + 1]]))
    out.append((vt.post_layernorm, [pts.IMG_FINAL_NORM, pts.GRAD_PROJECTOR_IN]))
    out.append((module.model.multi_modal_projector, [pts.PROJECTOR, pts.GRAD_PROJECTOR]))
    for i, layer in enumerate(lm.layers):
        out.append((layer.post_attention_layernorm if cfg.text.gemma2 else layer.self_attn, [pts.llm_block_attn(i)]))
        out.append((layer.post_feedforward_layernorm if cfg.text.gemma2 else layer.mlp, [pts.llm_block_mlp(i)]))
        out.append((layer, [pts.llm_block_out(i), llm_in[i]]))
    out.append((lm.norm, [pts.LLM_FINAL_NORM, pts.GRAD_HEAD_IN]))
    return out


def _hooks(module, cfg, out: dict, probes: dict) -> list:
    """Forward hooks recording the forward points and adding a probe where a gradient point is."""
    import torch

    def probed(names: list[str], x):
        grads = [n for n in names if n.startswith("grad/")]
        for g in grads:
            probes[g] = torch.zeros_like(x, requires_grad=True)
            x = x + probes[g]
        out.update({n: x for n in names if not n.startswith("grad/")})
        return x

    def hook(names):
        def run(_m, _args, output):
            if isinstance(output, tuple):
                return (probed(names, output[0]), *output[1:])
            return probed(names, output)

        return run

    hooks = [m.register_forward_hook(hook(names)) for m, names in _boundaries(module, cfg)]
    vt, lm = module.model.vision_tower, module.model.language_model
    hooks.append(
        vt.embeddings.patch_embedding.register_forward_hook(
            lambda _m, _a, o: out.__setitem__(pts.IMG_PATCH_EMBED, o.flatten(2).transpose(1, 2))
        )
    )

    def embeds(_m, args, kw):
        kw["inputs_embeds"] = probed([pts.LLM_INPUT, pts.grad_llm_block_in(0)], kw["inputs_embeds"])
        return args, kw

    hooks.append(lm.register_forward_pre_hook(embeds, with_kwargs=True))
    return hooks


def train_points(model, inputs: dict[str, np.ndarray], options: TrainOptions) -> dict[str, np.ndarray]:
    """Every point of points.train_points transformers has (backend.TrainPointsBackend), float32 numpy."""
    import torch

    from parity.inputs import validate_inputs

    cfg, module = model.config, model.module
    options.check()
    conv = model.conventions
    for flag, value in (("--frozen-dtype", options.frozen_dtype), ("--vit-matmul-dtype", options.vit_matmul_dtype)):
        if value != "float32":
            raise ConfigError(f"compare --train-step {flag} {value}: the transformers side trains in float32")
    inputs = validate_inputs(inputs, cfg, "inputs")
    if "mask_loss" not in inputs:
        raise InputsError(
            "inputs: no 'mask_loss' (the tokens to learn); make training inputs with parity inputs --suffix"
        )
    leaves = trainable_leaves(options, [e.key for e in spec.entries(cfg)])
    params = _leaf_params(module, cfg, leaves)
    trained = [p for pieces in params.values() for p, _, _ in pieces]
    ids = {id(p) for p in trained}
    for p in module.parameters():
        p.requires_grad_(id(p) in ids)
    batch = step_batch(model, inputs, conv.train_prefix == "causal")
    out: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    points: dict[str, np.ndarray] = {}
    s = cfg.num_image_tokens + inputs["text"].shape[1] - 1  # the shifted sequence's length
    layers = {e.key: e.layers for e in spec.entries(cfg)}
    from parity.torch_impl.api import matmul_precision

    try:
        for step in range(1, options.steps + 1):
            hooks = _hooks(module, cfg, out, probes) if step == 1 else []
            try:
                with matmul_precision(model.precision):
                    logits = module(**batch).logits[..., : cfg.text.vocab_size]
                    loss, example = text_loss(logits, cfg, inputs, conv.loss_normalization, None)
                    order = [g for g in pts.backward_points(cfg) if g in probes]
                    flat = torch.autograd.grad(loss, [probes[g] for g in order] + trained)
            finally:
                for h in hooks:
                    h.remove()
            grad_of = {id(p): g for p, g in zip(trained, flat[len(order) :], strict=True)}
            if step == 1:
                out[pts.LOGITS] = logits
                out.update(zip(order, flat[: len(order)], strict=True))
                cut = lambda k, v: v[:, :s] if v.ndim == 3 and not k.startswith(("img/", "grad/img/")) else v
                points.update({k: _numpy(cut(k, v)) for k, v in out.items()})
                points[pts.TRAIN_LOSS] = _numpy(loss)
                points[pts.TRAIN_EXAMPLE_LOSS] = _numpy(example)
                for key, pieces in params.items():
                    g = np.ascontiguousarray(_canonical(pieces, lambda p, grad_of=grad_of: grad_of[id(p)]), np.float32)
                    points[pts.grad_leaf(key)] = g
                    points.update({pts.grad_leaf(key, i): g[i] for i in range(layers[key] or 0)})
            else:
                points[pts.train_loss_at(step)] = _numpy(loss)
            with torch.no_grad():
                for p in trained:
                    p.sub_(options.lr * grad_of[id(p)])
    finally:
        for p in module.parameters():
            p.requires_grad_(False)
    if options.steps > 1:
        for key, pieces in params.items():
            points[pts.param_at(key, options.steps)] = np.ascontiguousarray(_canonical(pieces, lambda p: p), np.float32)
    return points


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy()
