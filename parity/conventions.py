"""The choices on which the reference implementations differ, as named options.

Every capture, comparison and golden file records the Conventions it was made with (`to_dict`), so each
reference can be reproduced exactly. Presets: `big_vision`, `transformers` (transformers 5.x, eager attention) and
`keras_hub` (keras-hub 0.32 PaliGemmaCausalLM, checked against it by tests/test_keras_hub.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

PositionOrigin = Literal[0, 1]
FinalSoftcap = Literal["always", "never", "decode_only"]
SlidingWindow = Literal["off", "transformers", "keras_hub"]
NormalizerDtype = Literal["param", "float32"]
LossNormalization = Literal["per_example", "per_token"]
TrainPrefix = Literal["bidirectional", "causal"]


@dataclasses.dataclass(frozen=True)
class Conventions:
    position_origin: PositionOrigin = 0
    """RoPE position of the first image token: 0 (big_vision, keras-hub) or 1 (transformers)."""

    final_softcap: FinalSoftcap = "decode_only"
    """Where the final-logit softcap (Gemma 2) applies: on every logit; never; or only on decode steps after the
    first generated token (big_vision: `text_logits` and prefill use `compute_logits`, extend steps do not)."""

    sliding_window: SlidingWindow = "off"
    """Gemma 2 local layers: "off" (big_vision: every layer global), "transformers" (5.x: in local layers a query
    sees keys with q - k < window among its causal keys, while the bidirectional image+prefix block stays fully
    visible) or "keras_hub" (a symmetric band |q - k| <= window - 1 over the allowed keys; the image+prefix block is
    not exempt: a query in it sees only the keys within window - 1 positions on either side)."""

    attn_softcap: bool = True
    """Apply the config's attention-logit softcap (every reference does; SDPA-based ports silently do not)."""

    normalizer_dtype: NormalizerDtype = "param"
    """Dtype in which sqrt(D) multiplies text embeddings: "param" rounds sqrt(D) to the embedding dtype and multiplies
    in it (big_vision, transformers 5.x; bf16 gives 45.25 for D=2048); "float32" multiplies in float32."""

    loss_normalization: LossNormalization = "per_example"
    """How a training step averages the token losses (parity.training): "per_example" sums each row's loss tokens,
    divides by max(count, 1) and means over the rows (big_vision's fine-tuning guide, keras-hub's presets here);
    "per_token" divides the batch's sum by its number of loss tokens (transformers' cross_entropy(reduction="mean")).
    Whether the final softcap is in the training logits is `final_softcap`, exactly as for the forward logits."""

    train_prefix: TrainPrefix = "bidirectional"
    """The attention of a training step: "bidirectional" over image + prefix as mask_ar says (big_vision; transformers
    given token_type_ids) or "causal" over every position, image tokens included (transformers without
    token_type_ids)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def forward_dict(self) -> dict[str, Any]:
        """The options a forward pass or a decoding depends on (to_dict without TRAIN_FIELDS)."""
        return forward_fields(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conventions:
        return cls(**d)

    def __post_init__(self):
        checks = {
            "position_origin": (0, 1),
            "final_softcap": ("always", "never", "decode_only"),
            "sliding_window": ("off", "transformers", "keras_hub"),
            "attn_softcap": (True, False),
            "normalizer_dtype": ("param", "float32"),
            "loss_normalization": ("per_example", "per_token"),
            "train_prefix": ("bidirectional", "causal"),
        }
        for field, allowed in checks.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"convention {field}={getattr(self, field)!r}; allowed: {allowed}")


TRAIN_FIELDS = ("loss_normalization", "train_prefix")  # options only a training step reads


def forward_fields(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded conventions dict without the training-only options: what two forward runs (captures, decodings,
    golden expectations) must agree on. Records made before those options existed lack them."""
    return None if d is None else {k: v for k, v in d.items() if k not in TRAIN_FIELDS}


PRESETS: dict[str, Conventions] = {
    "big_vision": Conventions(position_origin=0, final_softcap="decode_only", sliding_window="off"),
    "transformers": Conventions(
        position_origin=1, final_softcap="always", sliding_window="transformers", loss_normalization="per_token"
    ),
    # keras-hub: positions arange(S) (0-based over the whole sequence), `ReversibleEmbedding(logit_soft_cap)` on
    # every logit (forward and each decode step), the attention softcap on, sqrt(D) cast to the embedding dtype.
    "keras_hub": Conventions(position_origin=0, final_softcap="always", sliding_window="keras_hub"),
}


def get_conventions(name: str) -> Conventions:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown convention preset {name!r}; known: {', '.join(PRESETS)}") from None


def with_settings(base: Conventions, settings: list[str] | tuple[str, ...]) -> Conventions:
    """`base` with each "name=value" applied in order (the CLI's repeatable `--set`); ValueError naming the field,
    the value and what is allowed when one is unknown or out of range."""
    fields = {f.name: f for f in dataclasses.fields(Conventions)}
    changes: dict[str, Any] = {}
    for item in settings:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        default = fields[name].default
        if isinstance(default, bool):
            value: Any = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}.get(
                raw.lower(), raw
            )
        elif isinstance(default, int):
            value = int(raw) if raw.lstrip("-").isdigit() else raw
        else:
            value = raw
        changes[name] = value
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None
