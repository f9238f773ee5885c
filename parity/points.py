"""Names of the capture points: one list shared by both implementations (never retyped as strings).

Each implementation calls these functions/constants where it records an activation, so the same name means the
same tensor in PyTorch and in JAX. Shapes (B batch, T image tokens, S = T + text length):
  img/*           float[B, T, Dv]   (IMG_PATCH_EMBED before the position embedding is added)
  PROJECTOR       float[B, T, D]
  llm/*           float[B, S, D]
  LOGITS          float[B, S, V]
  llm/layerNN/k_cache, v_cache   float[B, S_cache, K, H]   (generation only)
"""
from __future__ import annotations

import fnmatch

from parity.config import PaliGemmaConfig

IMG_PATCH_EMBED = "img/patch_embed"
IMG_POS_EMBED = "img/with_posemb"
IMG_FINAL_NORM = "img/encoder_norm"
PROJECTOR = "img/projector"
LLM_INPUT = "llm/input_embeddings"
LLM_FINAL_NORM = "llm/final_norm"
LOGITS = "logits"


def img_block_attn(i: int) -> str:
    """Output of the attention branch of ViT block i (before the residual add)."""
    return f"img/block{i:02d}/attn"


def img_block_out(i: int) -> str:
    """Residual stream after ViT block i."""
    return f"img/block{i:02d}/out"


def llm_block_attn(i: int) -> str:
    """Output of the attention branch of LLM block i (after the post-attention norm in Gemma 2)."""
    return f"llm/layer{i:02d}/attn"


def llm_block_mlp(i: int) -> str:
    """Output of the MLP branch of LLM block i (after the post-ffw norm in Gemma 2)."""
    return f"llm/layer{i:02d}/mlp"


def llm_block_out(i: int) -> str:
    """Residual stream after LLM block i."""
    return f"llm/layer{i:02d}/out"


def llm_k_cache(i: int) -> str:
    return f"llm/layer{i:02d}/k_cache"


def llm_v_cache(i: int) -> str:
    return f"llm/layer{i:02d}/v_cache"


def forward_points(config: PaliGemmaConfig) -> list[str]:
    """Every point of a forward pass, in the order the model computes them."""
    pts = [IMG_PATCH_EMBED, IMG_POS_EMBED]
    for i in range(config.vision.depth):
        pts += [img_block_attn(i), img_block_out(i)]
    pts += [IMG_FINAL_NORM, PROJECTOR, LLM_INPUT]
    for i in range(config.text.depth):
        pts += [llm_block_attn(i), llm_block_mlp(i), llm_block_out(i)]
    return pts + [LLM_FINAL_NORM, LOGITS]


def cache_points(config: PaliGemmaConfig) -> list[str]:
    return [p for i in range(config.text.depth) for p in (llm_k_cache(i), llm_v_cache(i))]


def select(points: list[str], patterns: str | list[str] | None) -> list[str]:
    """Points matching any glob (comma-separated string or list); None selects all. `logits` is always kept."""
    if patterns is None:
        return list(points)
    pats = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip()]
    chosen = [p for p in points if any(fnmatch.fnmatchcase(p, g) for g in pats)]
    if LOGITS in points and LOGITS not in chosen:
        chosen.append(LOGITS)
    return chosen
