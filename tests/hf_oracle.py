"""transformers' PaliGemmaForConditionalGeneration as a test oracle: built from `to_hf_config`, loaded from
`spec.to_hf`, with forward hooks that record the tensors of our capture points (no transformers code copied)."""
from __future__ import annotations

import numpy as np
import torch

from converters.hf_config import to_hf_config
from parity import points, spec
from parity.config import PaliGemmaConfig

# On-disk (spec) names -> transformers 5.x in-memory module names.
_RENAMES = (("vision_tower.vision_model.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("language_model.model.", "model.language_model."))


def hf_model(cfg: PaliGemmaConfig, params: dict[str, np.ndarray]):
    import transformers

    d = to_hf_config(cfg)
    d.pop("parity_config")
    hc = transformers.PaliGemmaConfig(**d)
    hc._attn_implementation = "eager"
    hc.text_config._attn_implementation = "eager"
    hc.vision_config._attn_implementation = "eager"
    model = transformers.PaliGemmaForConditionalGeneration(hc).eval()
    state = {}
    for key, x in spec.to_hf(cfg, params).items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        state[key] = torch.from_numpy(np.ascontiguousarray(x))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def hf_batch(cfg: PaliGemmaConfig, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our right-padded [image ; text] batch in transformers' terms (image placeholder ids, token_type_ids)."""
    b, t = inputs["text"].shape[0], cfg.num_image_tokens
    ids = np.concatenate([np.full((b, t), cfg.image_token_id), inputs["text"]], axis=1)
    mask = np.concatenate([np.ones((b, t)), inputs.get("mask_input", np.ones_like(inputs["text"]))], axis=1)
    ttype = np.concatenate([np.zeros((b, t)), inputs["mask_ar"]], axis=1)
    return dict(input_ids=torch.as_tensor(ids, dtype=torch.long),
                pixel_values=torch.as_tensor(inputs["image"]).permute(0, 3, 1, 2).contiguous(),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                token_type_ids=torch.as_tensor(ttype, dtype=torch.long))


@torch.no_grad()
def hf_forward(model, cfg: PaliGemmaConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every forward point of parity.points, recorded from transformers' modules by hooks."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def record(module, name, fn=lambda o: o):
        def hook(_m, _args, output):
            out[name] = fn(output[0] if isinstance(output, tuple) else output)
        hooks.append(module.register_forward_hook(hook))

    vt, lm = model.model.vision_tower, model.model.language_model
    record(vt.embeddings.patch_embedding, points.IMG_PATCH_EMBED, lambda o: o.flatten(2).transpose(1, 2))
    record(vt.embeddings, points.IMG_POS_EMBED)
    for i, layer in enumerate(vt.encoder.layers):
        record(layer.self_attn, points.img_block_attn(i))
        record(layer, points.img_block_out(i))
    record(vt.post_layernorm, points.IMG_FINAL_NORM)
    record(model.model.multi_modal_projector, points.PROJECTOR)
    hooks.append(lm.register_forward_pre_hook(
        lambda _m, _a, kw: out.__setitem__(points.LLM_INPUT, kw["inputs_embeds"]), with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        record(layer.post_attention_layernorm if cfg.text.gemma2 else layer.self_attn, points.llm_block_attn(i))
        record(layer.post_feedforward_layernorm if cfg.text.gemma2 else layer.mlp, points.llm_block_mlp(i))
        record(layer, points.llm_block_out(i))
    record(lm.norm, points.LLM_FINAL_NORM)
    try:
        res = model(**hf_batch(cfg, inputs))
    finally:
        for h in hooks:
            h.remove()
    out[points.LOGITS] = res.logits[..., : cfg.text.vocab_size]
    return {k: v.float().numpy() for k, v in out.items()}


@torch.no_grad()
def hf_generate_row(model, cfg: PaliGemmaConfig, inputs: dict[str, np.ndarray], row: int, max_new: int,
                    eos_token_id: int | None = 1):
    """Greedy generation for one row (its real tokens only: no padding). Returns (tokens [n], logits [n, V]).
    eos_token_id=None: exactly `max_new` tokens, through any <eos>."""
    n = int(inputs.get("mask_input", np.ones_like(inputs["text"]))[row].sum())
    one = {k: (v[row: row + 1] if k == "image" else v[row: row + 1, :n]) for k, v in inputs.items()}
    batch = hf_batch(cfg, one)
    res = model.generate(**batch, max_new_tokens=max_new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=eos_token_id, pad_token_id=0)
    tokens = res.sequences[0, batch["input_ids"].shape[1]:].numpy()
    logits = torch.stack(res.logits, dim=1)[0, :, : cfg.text.vocab_size].float().numpy()
    return tokens, logits


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
