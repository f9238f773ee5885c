"""Model configurations: every released PaliGemma / PaliGemma 2 variant plus tiny ones for tests.

Frozen dataclasses, framework-free, shared by both implementations, the spec and the converters.
Axis letters used throughout the project (the legend of every einsum and every spec shape):

  vision:  Lv depth, Dv width, Fv mlp width, Nv heads, Hv head dim, P patch size, T image tokens
  text:    L depth, D width, F mlp width, N query heads, K kv heads, H head dim, V vocabulary rows
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any


class QueryScale(str, enum.Enum):  # noqa: UP042 (StrEnum would change str() in recorded manifests)
    """How attention queries are scaled before the logits (big_vision `query_pre_attn_norm`)."""

    HEAD_DIM = "rsqrt_head_dim"  # 1/sqrt(H): every variant except PaliGemma 2 28B
    WIDTH_PER_HEAD = "rsqrt_emb_per_head"  # 1/sqrt(D/N): PaliGemma 2 28B (1/sqrt(144))


@dataclasses.dataclass(frozen=True, slots=True)
class VisionConfig:
    """SigLIP ViT (So400m/14 for every release): pre-LN blocks, learned position embedding, no pooling."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True, slots=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 257_152
    gemma2: bool = False  # post-attention / post-ffw norms
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None  # on local layers (even indices) when set
    query_scale: QueryScale = QueryScale.HEAD_DIM
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if not self.gemma2 and (self.attn_softcap or self.final_softcap or self.sliding_window):
            raise ValueError("softcaps and sliding windows are Gemma 2 features (gemma2=True)")

    @property
    def fused_qkv(self) -> bool:
        """big_vision stores one `qkv_einsum` (3,N,D,H) when K == N, else `q_einsum` + `kv_einsum`."""
        return self.num_heads == self.num_kv_heads

    @property
    def query_scale_value(self) -> float:
        if self.query_scale is QueryScale.WIDTH_PER_HEAD:
            return (self.width // self.num_heads) ** -0.5
        return self.head_dim**-0.5

    def is_local_layer(self, i: int) -> bool:
        """Gemma 2 alternates local (sliding window, even index) and global (odd index) layers."""
        return self.sliding_window is not None and i % 2 == 0


@dataclasses.dataclass(frozen=True, slots=True)
class PaliGemmaConfig:
    name: str
    vision: VisionConfig
    text: TextConfig

    @property
    def family(self) -> str:
        return "paligemma2" if self.text.gemma2 else "paligemma"

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def hf_vocab_rows(self) -> int:
        """Rows of Hugging Face's `embed_tokens`: vocab + `<image>` + 1, padded to a multiple of 64."""
        return math.ceil((self.text.vocab_size + 2) / 64) * 64

    @property
    def image_token_id(self) -> int:
        """Hugging Face's `<image>` token id: the first id past the real vocabulary."""
        return self.text.vocab_size

    def symbols(self) -> dict[str, int]:
        """Values of the axis letters (module docstring) for this config."""
        v, t = self.vision, self.text
        return dict(
            Lv=v.depth,
            Dv=v.width,
            Fv=v.mlp_dim,
            Nv=v.num_heads,
            Hv=v.head_dim,
            P=v.patch_size,
            T=v.num_patches,
            L=t.depth,
            D=t.width,
            F=t.mlp_dim,
            N=t.num_heads,
            K=t.num_kv_heads,
            H=t.head_dim,
            V=t.vocab_size,
            Vhf=self.hf_vocab_rows,
        )

    @classmethod
    def from_symbols(cls, name: str, sym: dict[str, int], **text: Any) -> PaliGemmaConfig:
        """The inverse of `symbols()`: the config whose letters are `sym` (the image size from T and P; Hv and Vhf
        follow from the others). `text`: TextConfig fields that no letter tells (softcaps, window, query scale).
        KeyError for a missing letter, ValueError for values no config can have."""
        side = round(sym["T"] ** 0.5)
        vision = VisionConfig(
            width=sym["Dv"],
            depth=sym["Lv"],
            mlp_dim=sym["Fv"],
            num_heads=sym["Nv"],
            patch_size=sym["P"],
            image_size=side * sym["P"],
        )
        return cls(
            name,
            vision,
            TextConfig(
                width=sym["D"],
                depth=sym["L"],
                mlp_dim=sym["F"],
                num_heads=sym["N"],
                num_kv_heads=sym["K"],
                head_dim=sym["H"],
                vocab_size=sym["V"],
                **text,
            ),
        )

    def with_name(self, name: str) -> PaliGemmaConfig:
        return dataclasses.replace(self, name=name)

    # -- serialisation (the sidecar JSON, capture manifests, golden files) --------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text"]["query_scale"] = self.text.query_scale.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaliGemmaConfig:
        try:
            text = dict(d["text"])
            text["query_scale"] = QueryScale(text.get("query_scale", QueryScale.HEAD_DIM.value))
            return cls(name=d.get("name", "custom"), vision=VisionConfig(**d["vision"]), text=TextConfig(**text))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a paligemma-parity config: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# -- released variants ------------------------------------------------------------------------------------------
GEMMA_2B = TextConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
# What every released Gemma 2 sets and shapes cannot tell (checkpoints without a config are read with these).
GEMMA2_DEFAULTS = dict(gemma2=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096)
GEMMA2_2B = TextConfig(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256, **GEMMA2_DEFAULTS)
GEMMA2_9B = TextConfig(
    width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8, head_dim=256, **GEMMA2_DEFAULTS
)
GEMMA2_27B = TextConfig(
    width=4608,
    depth=46,
    mlp_dim=36864,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    query_scale=QueryScale.WIDTH_PER_HEAD,
    **GEMMA2_DEFAULTS,
)

RESOLUTIONS = (224, 448, 896)
_LLMS = {
    "paligemma-3b": GEMMA_2B,
    "paligemma2-3b": GEMMA2_2B,
    "paligemma2-10b": GEMMA2_9B,
    "paligemma2-28b": GEMMA2_27B,
}

VARIANTS: dict[str, PaliGemmaConfig] = {
    f"{llm}-{res}": PaliGemmaConfig(f"{llm}-{res}", VisionConfig(image_size=res), text)
    for llm, text in _LLMS.items()
    for res in RESOLUTIONS
}

# -- tiny variants for tests: between them MQA, GQA, K == N (fused qkv), N*H != D, the 28B query scale,
#    Gemma 2 post-norms, softcaps and a sliding window shorter than a test sequence. ---------------------------------
TINY_VISION = VisionConfig(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=7, image_size=28)
TINY_VOCAB = 512
TINY_VARIANTS: dict[str, PaliGemmaConfig] = {
    c.name: c
    for c in [
        # PaliGemma 1 shapes: MQA (K = 1), N*H == D.
        PaliGemmaConfig(
            "tiny-pg1-mqa",
            TINY_VISION,
            TextConfig(width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=16, vocab_size=TINY_VOCAB),
        ),
        # K == N: big_vision stores a fused qkv_einsum; N*H != D.
        PaliGemmaConfig(
            "tiny-pg1-kn",
            TINY_VISION,
            TextConfig(width=48, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=2, head_dim=16, vocab_size=TINY_VOCAB),
        ),
        # PaliGemma 2 shapes: GQA, N*H != D, post-norms, softcaps, sliding window 8 (< test sequences).
        PaliGemmaConfig(
            "tiny-pg2-gqa",
            TINY_VISION,
            TextConfig(
                width=48,
                depth=3,
                mlp_dim=96,
                num_heads=4,
                num_kv_heads=2,
                head_dim=16,
                vocab_size=TINY_VOCAB,
                gemma2=True,
                attn_softcap=50.0,
                final_softcap=30.0,
                sliding_window=8,
            ),
        ),
        # The 28B query scale 1/sqrt(D/N) with D/N != H.
        PaliGemmaConfig(
            "tiny-pg2-28b",
            TINY_VISION,
            TextConfig(
                width=72,
                depth=2,
                mlp_dim=96,
                num_heads=4,
                num_kv_heads=2,
                head_dim=8,
                vocab_size=TINY_VOCAB,
                gemma2=True,
                attn_softcap=50.0,
                final_softcap=30.0,
                sliding_window=8,
                query_scale=QueryScale.WIDTH_PER_HEAD,
            ),
        ),
    ]
}

ALL_VARIANTS: dict[str, PaliGemmaConfig] = {**VARIANTS, **TINY_VARIANTS}


def get_config(name: str) -> PaliGemmaConfig:
    """Exact-name lookup; the error lists every valid name."""
    try:
        return ALL_VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(ALL_VARIANTS)}") from None
