"""Hugging Face `config.json` for PaliGemma (PaliGemmaConfig with a gemma or gemma2 text config), both ways.

Written so that `PaliGemmaForConditionalGeneration.from_pretrained(dir)` builds exactly our model with no missing
and no unexpected keys; read from any hub or `save_pretrained` config.json.
"""
from __future__ import annotations

from typing import Any

from parity.config import PaliGemmaConfig, QueryScale, TextConfig, VisionConfig

HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def to_hf_config(config: PaliGemmaConfig, dtype: str = "float32") -> dict[str, Any]:
    v, t = config.vision, config.text
    text: dict[str, Any] = {
        "model_type": "gemma2" if t.gemma2 else "gemma",
        "hidden_size": t.width,
        "intermediate_size": t.mlp_dim,
        "num_hidden_layers": t.depth,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "vocab_size": config.hf_vocab_rows,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": t.norm_eps,
        "rope_theta": t.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_base},
        "max_position_embeddings": 8192,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "dtype": HF_DTYPES[dtype],
    }
    if t.gemma2:
        text.update({
            "query_pre_attn_scalar": (t.width // t.num_heads if t.query_scale is QueryScale.WIDTH_PER_HEAD
                                      else t.head_dim),
            "attn_logit_softcapping": t.attn_softcap,
            "final_logit_softcapping": t.final_softcap,
            "sliding_window": t.sliding_window,
            "layer_types": ["sliding_attention" if t.is_local_layer(i) else "full_attention"
                            for i in range(t.depth)],
        })
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.depth,
        "num_attention_heads": v.num_heads,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_image_tokens": v.num_patches,
        "projection_dim": t.width,
        "layer_norm_eps": v.norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
        "dtype": HF_DTYPES[dtype],
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "image_token_index": config.image_token_id,
        "vocab_size": config.hf_vocab_rows,
        "projection_dim": t.width,
        "hidden_size": t.width,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "tie_word_embeddings": True,
        "dtype": HF_DTYPES[dtype],
        "text_config": text,
        "vision_config": vision,
        "parity_config": config.to_dict(),  # ours, exact: read back first when present
    }


def from_hf_config(d: dict[str, Any], name: str = "from-config.json") -> PaliGemmaConfig:
    """Our config from a PaliGemma config.json. Raises ValueError naming the missing or unsupported field."""
    if "parity_config" in d:
        return PaliGemmaConfig.from_dict(d["parity_config"])
    if d.get("model_type") != "paligemma":
        raise ValueError(f"model_type is {d.get('model_type')!r}, expected 'paligemma'")
    try:
        t, v = d["text_config"], d.get("vision_config", {})
        gemma2 = t.get("model_type") == "gemma2"
        width, heads = t["hidden_size"], t["num_attention_heads"]
        head_dim = t.get("head_dim", 256)
        image_token = d.get("image_token_index", d.get("image_token_id", 257152))
        qscalar = t.get("query_pre_attn_scalar", head_dim) if gemma2 else head_dim
        if qscalar not in (head_dim, width // heads):
            raise ValueError(f"query_pre_attn_scalar {qscalar} is neither head_dim {head_dim} nor "
                             f"hidden_size/num_attention_heads {width // heads}")
        text = TextConfig(
            width=width, depth=t["num_hidden_layers"], mlp_dim=t["intermediate_size"], num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads", heads), head_dim=head_dim, vocab_size=image_token,
            gemma2=gemma2,
            attn_softcap=t.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            final_softcap=t.get("final_logit_softcapping", 30.0) if gemma2 else None,
            sliding_window=t.get("sliding_window", 4096) if gemma2 else None,
            query_scale=(QueryScale.HEAD_DIM if qscalar == head_dim else QueryScale.WIDTH_PER_HEAD),
            rope_base=float(t.get("rope_parameters", {}).get("rope_theta", t.get("rope_theta", 10000.0))),
            norm_eps=t.get("rms_norm_eps", 1e-6),
        )
        vision = VisionConfig(
            width=v.get("hidden_size", 1152), depth=v.get("num_hidden_layers", 27),
            mlp_dim=v.get("intermediate_size", 4304), num_heads=v.get("num_attention_heads", 16),
            patch_size=v.get("patch_size", 14), image_size=v.get("image_size", 224),
            norm_eps=v.get("layer_norm_eps", 1e-6),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks field {e}") from None
    return PaliGemmaConfig(name, vision, text)
