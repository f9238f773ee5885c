"""Hugging Face `config.json` for PaliGemma (PaliGemmaConfig with a gemma or gemma2 text config), both ways.

Written so that `PaliGemmaForConditionalGeneration.from_pretrained(dir)` builds exactly our model with no missing
and no unexpected keys; read from any hub or `save_pretrained` config.json.
"""

from __future__ import annotations

import math
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
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "dtype": HF_DTYPES[dtype],
    }
    if t.gemma2:
        text.update(
            {
                "query_pre_attn_scalar": (
                    t.width // t.num_heads if t.query_scale is QueryScale.WIDTH_PER_HEAD else t.head_dim
                ),
                "attn_logit_softcapping": t.attn_softcap,
                "final_logit_softcapping": t.final_softcap,
                "sliding_window": t.sliding_window,
                "layer_types": [
                    "sliding_attention" if t.is_local_layer(i) else "full_attention" for i in range(t.depth)
                ],
            }
        )
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
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "tie_word_embeddings": True,
        "dtype": HF_DTYPES[dtype],
        "text_config": text,
        "vision_config": vision,
        "parity_config": config.to_dict(),  # ours, exact: read back first when present
    }


MAX_SIZE = 2**31 - 1  # widths, heads, vocabulary: far above every release, low enough to never overflow an index
MAX_DEPTH = 10_000  # layers: per-layer keys are enumerated, so a hostile depth must not mean a billion keys


def _check_int(where: str, x: Any, lo: int = 1, hi: int = MAX_SIZE) -> int:
    if type(x) is not int:
        raise ValueError(f"{where} must be an integer, not {_jtype(x)} {x!r}"[:200])
    if not lo <= x <= hi:
        raise ValueError(f"{where} must be in [{lo}, {hi}], not {x}")
    return x


def _check_float(where: str, x: Any, optional: bool = False) -> float | None:
    if x is None and optional:
        return None
    if type(x) not in (int, float) or not math.isfinite(x) or x <= 0:
        what = "a positive number" + (" or null" if optional else "")
        raise ValueError(f"{where} must be {what}, not {_jtype(x)} {x!r}"[:200])
    return float(x)


def _jtype(x: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "the integer",
        float: "the number",
        type(None): "null",
    }.get(type(x), type(x).__name__)


def _obj(where: str, x: Any) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ValueError(f"{where} must be an object, not {_jtype(x)}")
    return x


def validate_config(cfg: PaliGemmaConfig) -> PaliGemmaConfig:
    """Every field of the declared type and range (sizes positive integers, eps/theta/softcaps positive finite
    numbers): a config read from a file is checked here before any shape is derived from it. ValueError."""
    v, t = cfg.vision, cfg.text
    if not isinstance(cfg.name, str):
        raise ValueError(f"name must be a string, not {_jtype(cfg.name)}")
    for f in ("width", "mlp_dim", "num_heads", "patch_size", "image_size"):
        _check_int(f"vision.{f}", getattr(v, f))
    _check_int("vision.depth", v.depth, hi=MAX_DEPTH)
    _check_float("vision.norm_eps", v.norm_eps)
    if v.width % v.num_heads:
        raise ValueError(f"vision width {v.width} is not a multiple of num_heads {v.num_heads}")
    if v.patch_size > v.image_size:
        raise ValueError(f"vision patch_size {v.patch_size} is larger than image_size {v.image_size}")
    for f in ("width", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        _check_int(f"text.{f}", getattr(t, f))
    _check_int("text.depth", t.depth, hi=MAX_DEPTH)
    if type(t.gemma2) is not bool:
        raise ValueError(f"text.gemma2 must be true or false, not {_jtype(t.gemma2)}")
    _check_float("text.attn_softcap", t.attn_softcap, optional=True)
    _check_float("text.final_softcap", t.final_softcap, optional=True)
    if t.sliding_window is not None:
        _check_int("text.sliding_window", t.sliding_window)
    _check_float("text.rope_base", t.rope_base)
    _check_float("text.norm_eps", t.norm_eps)
    if t.query_scale is QueryScale.WIDTH_PER_HEAD and t.width < t.num_heads:
        raise ValueError(f"text width {t.width} is smaller than num_heads {t.num_heads}")
    return cfg


def config_from_dict(d: Any) -> PaliGemmaConfig:
    """Our own serialised config (the npz sidecar, `parity_config`), validated. ValueError."""
    try:
        cfg = PaliGemmaConfig.from_dict(_obj("the config", d))
    except ArithmeticError as e:  # TextConfig checks num_heads % num_kv_heads first
        raise ValueError(f"not a paligemma-parity config: text.num_kv_heads must be a positive integer ({e})") from None
    for k, want in (("vision", VisionConfig), ("text", TextConfig)):
        if not isinstance(getattr(cfg, k), want):
            raise ValueError(f"{k} must be an object")
    try:
        return validate_config(cfg)
    except ValueError as e:
        raise ValueError(f"not a paligemma-parity config: {e}") from None


def from_hf_config(d: dict[str, Any], name: str = "from-config.json") -> PaliGemmaConfig:
    """Our config from a PaliGemma config.json. Raises ValueError naming the missing, mistyped or unsupported
    field (sizes must be JSON integers, eps/theta/softcaps numbers, sub-configs objects)."""
    d = _obj("config.json", d)
    if "parity_config" in d:
        return config_from_dict(d["parity_config"])
    if d.get("model_type") != "paligemma":
        raise ValueError(f"model_type is {d.get('model_type')!r}, expected 'paligemma'")
    if "text_config" not in d:
        raise ValueError("config.json lacks field 'text_config'")
    t = _obj("text_config", d["text_config"])
    v = _obj("vision_config", d.get("vision_config", {}))

    def need(where: dict, prefix: str, key: str):
        if key not in where:
            raise ValueError(f"config.json lacks field '{prefix}{key}'")
        return where[key]

    gemma2 = t.get("model_type") == "gemma2"
    width = _check_int("text_config.hidden_size", need(t, "text_config.", "hidden_size"))
    heads = _check_int("text_config.num_attention_heads", need(t, "text_config.", "num_attention_heads"))
    head_dim = _check_int("text_config.head_dim", t.get("head_dim", 256))
    image_token = _check_int("image_token_index", d.get("image_token_index", d.get("image_token_id", 257152)))
    qscalar = t.get("query_pre_attn_scalar", head_dim) if gemma2 else head_dim
    if type(qscalar) not in (int, float) or qscalar not in (head_dim, width // heads):
        raise ValueError(
            f"query_pre_attn_scalar {qscalar!r} is neither head_dim {head_dim} nor "
            f"hidden_size/num_attention_heads {width // heads}"
        )
    rope = _obj("text_config.rope_parameters", t.get("rope_parameters") or {})
    text = TextConfig(
        width=width,
        depth=_check_int("text_config.num_hidden_layers", need(t, "text_config.", "num_hidden_layers"), hi=MAX_DEPTH),
        mlp_dim=_check_int("text_config.intermediate_size", need(t, "text_config.", "intermediate_size")),
        num_heads=heads,
        num_kv_heads=_check_int("text_config.num_key_value_heads", t.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        vocab_size=image_token,
        gemma2=gemma2,
        attn_softcap=_check_float(
            "text_config.attn_logit_softcapping", t.get("attn_logit_softcapping", 50.0), optional=True
        )
        if gemma2
        else None,
        final_softcap=_check_float(
            "text_config.final_logit_softcapping", t.get("final_logit_softcapping", 30.0), optional=True
        )
        if gemma2
        else None,
        sliding_window=(
            None
            if t.get("sliding_window", 4096) is None
            else _check_int("text_config.sliding_window", t.get("sliding_window", 4096))
        )
        if gemma2
        else None,
        query_scale=(QueryScale.HEAD_DIM if qscalar == head_dim else QueryScale.WIDTH_PER_HEAD),
        rope_base=_check_float(
            "text_config.rope_parameters.rope_theta", rope.get("rope_theta", t.get("rope_theta", 10000.0))
        ),
        norm_eps=_check_float("text_config.rms_norm_eps", t.get("rms_norm_eps", 1e-6)),
    )
    vision = VisionConfig(
        width=_check_int("vision_config.hidden_size", v.get("hidden_size", 1152)),
        depth=_check_int("vision_config.num_hidden_layers", v.get("num_hidden_layers", 27), hi=MAX_DEPTH),
        mlp_dim=_check_int("vision_config.intermediate_size", v.get("intermediate_size", 4304)),
        num_heads=_check_int("vision_config.num_attention_heads", v.get("num_attention_heads", 16)),
        patch_size=_check_int("vision_config.patch_size", v.get("patch_size", 14)),
        image_size=_check_int("vision_config.image_size", v.get("image_size", 224)),
        norm_eps=_check_float("vision_config.layer_norm_eps", v.get("layer_norm_eps", 1e-6)),
    )
    return validate_config(PaliGemmaConfig(name, vision, text))
