"""PaliGemma (1 and 2): image tokens, then text tokens, through a prefix-LM Gemma decoder (Flax NNX).

Axis letters: B batch, T image tokens, L text length, S = T + L, D LLM width, V vocabulary rows.
Parameter paths are the canonical keys (`img/...` with the projector at `img/head`, `llm/...`), stacked layers
included, so the released npz layout loads with no transform (load.py).
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from parity import points
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.jax_impl.attention import positions_from_mask, prefix_lm_mask, same_block, sliding_window_mask
from parity.jax_impl.decoder import Gemma
from parity.jax_impl.projector import Projector
from parity.jax_impl.vision import SigLIP


class PaliGemma(nnx.Module):
    def __init__(self, config: PaliGemmaConfig, conventions: Conventions = Conventions()):  # noqa: B008 (frozen, immutable)
        self.config = config
        self.conventions = conventions
        self.img = SigLIP(config.vision)
        self.img.head = Projector(config.vision.width, config.text.width)
        self.llm = Gemma(config.text)

    # -- embeddings ------------------------------------------------------------------------------------------------
    def embed_image(
        self, image: jax.Array, capture: Collection[str] = (), out: dict | None = None, dtype_mm=None
    ) -> jax.Array:
        """image float[B, H, W, 3] in [-1, 1] -> float[B, T, D] (projected; not scaled by sqrt(D)); `dtype_mm`:
        big_vision's img.dtype_mm (vision.py), None for a forward run."""
        out = {} if out is None else out
        z = self.img.head(self.img(image, capture, out, dtype_mm))
        if points.PROJECTOR in capture:
            out[points.PROJECTOR] = z
        return z

    def embed_text(self, text: jax.Array) -> jax.Array:
        """text int[B, L] -> float[B, L, D], scaled by sqrt(D) in the convention's dtype."""
        return self.llm.embedder.encode(text, self.conventions.normalizer_dtype)

    def embed(self, image, text, capture: Collection[str] = (), out: dict | None = None) -> jax.Array:
        """-> float[B, S, D]: [image tokens ; text tokens]."""
        out = {} if out is None else out
        x = self.join(self.embed_image(image, capture, out), text)
        if points.LLM_INPUT in capture:
            out[points.LLM_INPUT] = x
        return x

    def join(self, image_tokens: jax.Array, text: jax.Array) -> jax.Array:
        """Projected image tokens float[B, T, D] and text int[B, L] -> the LLM's input float[B, S, D]: [image tokens ;
        text embeddings scaled by sqrt(D)] (the image tokens are not scaled)."""
        return jnp.concatenate([image_tokens, self.embed_text(text)], axis=1)

    # -- masks -----------------------------------------------------------------------------------------------------
    def full_masks(self, text_mask_ar: jax.Array, text_mask_input: jax.Array, causal: bool = False):
        """Masks of the whole prompt [image ; text]: (input_mask, mask_ar, positions, {"global", "local"}).
        causal: every position its own block, image tokens included (the `train_prefix="causal"` convention)."""
        b, t = text_mask_ar.shape[0], self.config.num_image_tokens
        ones = jnp.ones((b, t), jnp.int32)
        input_mask = jnp.concatenate([ones, text_mask_input.astype(jnp.int32)], axis=1)
        mask_ar = jnp.concatenate([jnp.zeros_like(ones), text_mask_ar.astype(jnp.int32)], axis=1)
        if causal:
            mask_ar = jnp.ones_like(mask_ar)
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
    def __call__(
        self,
        image: jax.Array,
        text: jax.Array,
        mask_ar: jax.Array,
        mask_input: jax.Array | None = None,
        capture: Collection[str] = (),
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Score a batch. image float[B, H, W, 3]; text, mask_ar, mask_input int[B, L] (mask_input 1 on real
        tokens, default all ones). Returns (logits float[B, S, V], {point: array} for exactly `capture`)."""
        capture = frozenset(capture)
        unknown = capture - set(points.forward_points(self.config))
        if unknown:
            raise ValueError(f"capture points not produced by a forward pass: {sorted(unknown)}")
        if mask_input is None:
            mask_input = jnp.ones_like(text)
        out: dict[str, jax.Array] = {}
        x = self.embed(image, text, capture, out)
        _, _, positions, masks = self.full_masks(mask_ar, mask_input)
        x, _ = self.llm(x, positions, masks, attn_softcap=self.attn_softcap, capture=capture, out=out)
        logits = self.head(x)
        if points.LOGITS in capture:
            out[points.LOGITS] = logits
        return logits, out

    def head(self, x: jax.Array) -> jax.Array:
        """Final-normed float[B, S, D] -> logits float[B, S, V] as the forward pass scores them: the final softcap
        only under the "always" convention (decoding caps its own)."""
        return self.llm.logits(x, capped=self.conventions.final_softcap == "always")

    # -- units (teacher forcing: one unit of the graph run on another run's input to it) ----------------------------
    def unit(self, point: str, x: jax.Array, text: jax.Array) -> jax.Array:
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
