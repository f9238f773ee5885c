"""PaliGemma (1 and 2): image tokens, then text tokens, through a prefix-LM Gemma decoder.

Axis letters: B batch, T image tokens, L text length, S = T + L, D LLM width, V vocabulary rows.
Parameter names mirror the canonical keys: `img.*` (ViT + `img.head` projector) and `llm.*` (decoder), with the
stacked layer axis unrolled into `.{i}.` (see load.py).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from parity import points
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.torch_impl.attention import positions_from_mask, prefix_lm_mask, same_block, sliding_window_mask
from parity.torch_impl.decoder import Gemma
from parity.torch_impl.projector import Projector
from parity.torch_impl.vision import SigLIP


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig, conventions: Conventions = Conventions()):  # noqa: B008 (frozen, immutable)
        super().__init__()
        self.config = config
        self.conventions = conventions
        self.img = SigLIP(config.vision)
        self.img.head = Projector(config.vision.width, config.text.width)
        self.llm = Gemma(config.text)

    # -- embeddings ------------------------------------------------------------------------------------------------
    def embed_image(
        self, image: torch.Tensor, capture: Collection[str] = (), out: dict | None = None, dtype_mm=None
    ) -> torch.Tensor:
        """image float[B, H, W, 3] in [-1, 1] -> float[B, T, D] (projected; not scaled by sqrt(D)); `dtype_mm`:
        big_vision's img.dtype_mm (vision.py), None for a forward run."""
        out = {} if out is None else out
        z = self.img.head(self.img(image, capture, out, dtype_mm))
        if points.PROJECTOR in capture:
            out[points.PROJECTOR] = z
        return z

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text int[B, L] -> float[B, L, D], scaled by sqrt(D) in the convention's dtype."""
        return self.llm.embedder.encode(text, self.conventions.normalizer_dtype)

    def embed(self, image, text, capture: Collection[str] = (), out: dict | None = None) -> torch.Tensor:
        """-> float[B, S, D]: [image tokens ; text tokens]."""
        out = {} if out is None else out
        x = self.join(self.embed_image(image, capture, out), text)
        if points.LLM_INPUT in capture:
            out[points.LLM_INPUT] = x
        return x

    def join(self, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Projected image tokens float[B, T, D] and text int[B, L] -> the LLM's input float[B, S, D]: [image tokens ;
        text embeddings scaled by sqrt(D)] (the image tokens are not scaled)."""
        return torch.cat([image_tokens, self.embed_text(text)], dim=1)

    # -- masks -----------------------------------------------------------------------------------------------------
    def full_masks(
        self, text_mask_ar: torch.Tensor, text_mask_input: torch.Tensor, causal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Masks of the whole prompt [image ; text]: (input_mask, mask_ar, positions, {"global", "local"}).
        causal: every position its own block, image tokens included (the `train_prefix="causal"` convention)."""
        b, t = text_mask_ar.shape[0], self.config.num_image_tokens
        ones = torch.ones(b, t, dtype=text_mask_input.dtype, device=text_mask_input.device)
        input_mask = torch.cat([ones, text_mask_input], dim=1)
        mask_ar = torch.cat([torch.zeros_like(ones), text_mask_ar.to(ones.dtype)], dim=1)
        if causal:
            mask_ar = torch.ones_like(mask_ar)
        attn = prefix_lm_mask(input_mask, mask_ar)
        rel = positions_from_mask(input_mask, 0)
        masks = {"global": attn, "local": None}
        if self.windowed:
            masks["local"] = sliding_window_mask(
                attn,
                rel,
                rel,
                self.config.text.sliding_window,
                same_block(mask_ar),
                rule=self.conventions.sliding_window,
            )
        return input_mask, mask_ar, rel + self.conventions.position_origin, masks

    @property
    def windowed(self) -> bool:
        return self.conventions.sliding_window != "off" and self.config.text.sliding_window is not None

    @property
    def attn_softcap(self) -> bool:
        return self.conventions.attn_softcap and self.config.text.attn_softcap is not None

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        mask_ar: torch.Tensor,
        mask_input: torch.Tensor | None = None,
        capture: Collection[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score a batch. image float[B, H, W, 3]; text, mask_ar, mask_input int[B, L] (mask_input 1 on real
        tokens, default all ones). Returns (logits float[B, S, V], {point: tensor} for exactly `capture`)."""
        capture = frozenset(capture)
        unknown = capture - set(points.forward_points(self.config))
        if unknown:
            raise ValueError(f"capture points not produced by a forward pass: {sorted(unknown)}")
        if mask_input is None:
            mask_input = torch.ones_like(text)
        out: dict[str, torch.Tensor] = {}
        x = self.embed(image, text, capture, out)
        _, _, positions, masks = self.full_masks(mask_ar, mask_input)
        x, _ = self.llm(x, positions, masks, attn_softcap=self.attn_softcap, capture=capture, out=out)
        logits = self.head(x)
        if points.LOGITS in capture:
            out[points.LOGITS] = logits
        return logits, out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed float[B, S, D] -> logits float[B, S, V] as the forward pass scores them: the final softcap
        only under the "always" convention (decoding caps its own)."""
        return self.llm.logits(x, capped=self.conventions.final_softcap == "always")

    # -- units (teacher forcing: one unit of the graph run on another run's input to it) ----------------------------
    def unit(self, point: str, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The unit whose output is capture point `point` (a key of points.graph_units) on its input x, computed as
        in the forward pass; text int[B, L]: the text tokens the image/text concatenation joins."""
        if point == points.IMG_FINAL_NORM:
            return self.img.Transformer.encoder_norm(x)
        if point == points.PROJECTOR:
            return self.img.head(x)
        if point == points.LLM_INPUT:
            return self.join(x, text)
        if point == points.LLM_FINAL_NORM:
            return self.llm.final_norm(x)
        if point == points.LOGITS:
            return self.head(x)
        raise ValueError(
            f"unit {point!r}: the units between the blocks are {', '.join(points.graph_units(self.config))}"
        )
